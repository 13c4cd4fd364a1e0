"""Rewrite: every eligible conv/linear of the plan becomes a SAS layer, function-preserving.

Why: this is the one place a graph changes. Module calls get their module swapped for a
``SASLinear``/``SASConv{1,2}d`` built by ``from_dense``; functional calls on a parameter get
the parameter replaced by its wide version and the call replaced by the ``sas::`` op; on a
dynamo graph (weights are graph inputs) the call becomes ``sas::linear_from_dense`` /
``sas::conv2d_from_dense``, which expand the live dense parameter once per version (cached,
so the compiled model never serves a stale copy and never re-expands per call); elsewhere it
calls the op's Python entry point, which ``torch.func`` transforms can differentiate. A folded
ReLU is bypassed for the SAS layer only; it is erased when nothing else reads it.

What is converted keeps what the user set on it: ``requires_grad``, dtype, device, names,
the train/eval flag, and ties: every call site of one dense weight gets the same wide
Parameter, and a bias stays the very Parameter it was (so a tied bias stays tied).

When the change is a pure module swap (:func:`is_module_swap`: every converted call is a
module call, every folded ReLU an ``nn.ReLU`` module that a swap for ``nn.Identity``
expresses), :func:`swap_sas_modules` applies the same plan to a copy of the user's model, so
it keeps its class.
"""
from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from sas_compile.runtime import sas_ops, sas_transposed
from sas_compile.runtime.layers import (SASConv1d, SASConv2d, SASConv3d, SASConvTranspose1d, SASConvTranspose2d,
                                        SASConvTranspose3d, SASLinear)
from sas_compile.runtime.projection import expand_dense_weight, expand_transposed_weight
from sas_compile.runtime.sws_mask import HOOK_DICTS

from .capture import copy_model, tensors_in
from .find_foldable_relus import relu_input
from .find_sas_layers import LAYER_MODULES, match_layer_call
from .plan import LayerPlan, Plan

log = logging.getLogger("sas_compile.passes")

__all__ = ["rewrite_layers_to_sas", "swap_sas_modules", "is_module_swap", "keep_module_swaps", "sas_module",
           "carry_model_state", "copy_for_rewrite", "holds_stand_ins", "dense_source", "meta_stand_in"]

# the attribute by which a meta stand-in names the dense weight it stands for
_SOURCE = "_sas_dense_source"


def meta_stand_in(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``tensor``'s shape and dtype (no data); a Parameter, with its
    ``requires_grad``, where ``tensor`` is one."""
    stand_in = torch.empty_like(tensor, device="meta")
    return nn.Parameter(stand_in, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else stand_in


def copy_for_rewrite(source: nn.Module, plan: Plan) -> nn.Module:
    """A deep copy of ``source`` for the rewrite of ``plan``, without the weights it replaces.

    Every dense weight of an eligible layer is replaced by the rewrite with a wide one, so the
    copy gets a meta stand-in for it (no data) that names the original (:func:`dense_source`),
    which the rewrite expands. A full copy held a second copy of every converted dense weight at
    the peak of ``sasify`` (95 of ResNet-50's 97 MB). Everything else is copied as ``deepcopy``
    copies it. :func:`holds_stand_ins` says whether one survived the rewrite (it must not).
    """
    memo: Dict[int, torch.Tensor] = {}
    for layer in plan.eligible():
        if layer.weight_kind == "placeholder" and layer.module_target is not None:
            owner_path, name = layer.module_target, "weight"  # a dynamo capture: a module swap
        elif layer.weight_kind == "placeholder" or not layer.weight_target:
            continue
        else:
            owner_path, _, name = layer.weight_target.rpartition(".")
        try:
            weight = getattr(source.get_submodule(owner_path) if owner_path else source, name)
        except AttributeError:  # not an attribute of this module (a path of another capture): copied
            continue
        if isinstance(weight, torch.Tensor) and id(weight) not in memo:
            stand_in = meta_stand_in(weight)
            setattr(stand_in, _SOURCE, weight)
            memo[id(weight)] = stand_in
    return copy_model(source, memo)


def dense_source(weight: torch.Tensor) -> torch.Tensor:
    """The dense weight to expand: ``weight`` itself, or the one a stand-in of :func:`copy_for_rewrite` names."""
    return getattr(weight, _SOURCE, weight)


def holds_stand_ins(model: nn.Module) -> bool:
    """Whether a stand-in of :func:`copy_for_rewrite` is still in ``model``: a parameter, a buffer,
    or an attribute of one of its modules (a tensor, or one in a list, tuple or dict it holds)."""
    return any(hasattr(tensor, _SOURCE) for module in model.modules() for value in vars(module).values()
               for tensor in tensors_in(value, depth=2))


# the SAS layer of each stock layer module (``find_sas_layers.LAYER_MODULES``)
SAS_CLASS = {nn.Linear: SASLinear, nn.Conv1d: SASConv1d, nn.Conv2d: SASConv2d, nn.Conv3d: SASConv3d,
             nn.ConvTranspose1d: SASConvTranspose1d, nn.ConvTranspose2d: SASConvTranspose2d,
             nn.ConvTranspose3d: SASConvTranspose3d}


def sas_module(dense: nn.Module, M: int, fold: bool, rule: str, wide: Optional[nn.Parameter] = None, *,
               weight_in_out: bool = False) -> nn.Module:
    """The SAS layer computing the same function as ``dense`` (``dense(relu(x))`` if folded).

    It keeps ``dense``'s bias Parameter itself and its train/eval flag; ``wide``, when given,
    is the wide weight of another SAS layer of the same dense weight, which it then shares.
    A stand-in weight (:func:`copy_for_rewrite`) is expanded from the weight it names.
    ``weight_in_out``: ``dense`` computes ``addmm(b, x, W)`` or ``x @ W`` with ``W`` stored
    ``[in, out]`` and nothing else (transformers' Conv1D, proved by the analysis): it becomes a
    SAS linear on ``W^T``. Another module that is not a Linear/Conv was proved ``x @ W.T + b``.
    """
    source = dense_source(dense.weight)
    if weight_in_out or not isinstance(dense, LAYER_MODULES):
        # a module the analysis proved a linear written with other ops (addmm, x @ W.T)
        return _sas_linear_of(dense, source.t() if weight_in_out else source, M, fold, rule, wide)
    if wide is None and source is not dense.weight:
        wide = _wide_like(source, M, fold, rule, getattr(dense, "groups", 1), getattr(dense, "transposed", False) is True)
    sas_class = next((sas for cls, sas in SAS_CLASS.items() if isinstance(dense, cls)), None)
    if sas_class is None:
        raise TypeError(f"no SAS layer for {type(dense).__name__}")
    new = sas_class.from_dense(dense, M, fold_relu=fold, rule=rule)
    if wide is not None:
        new.weight = wide
    if dense.bias is not None:
        new.bias = dense.bias  # the caller's copy: a bias tied to another module stays tied
    new.train(dense.training)
    carry_hooks(dense, new)
    return new


def _sas_linear_of(dense: nn.Module, source: torch.Tensor, M: int, fold: bool, rule: str,
                   wide: Optional[nn.Parameter]) -> nn.Module:
    """The SAS linear of a module proved to compute ``F.linear(x, source, dense.bias)`` with other
    ops; ``source`` is its weight as ``[out, in]`` (a transposed view of an ``[in, out]`` one)."""
    out_features, in_features = source.shape
    if wide is None:
        with torch.no_grad():
            expanded = expand_dense_weight(source.detach(), M, fold_relu=fold, rule=rule)
        wide = nn.Parameter(expanded, requires_grad=source.requires_grad)
    template = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=source.dtype)
    new = SASLinear.from_dense(template, M, fold_relu=fold, rule=rule)
    new.weight = wide
    if getattr(dense, "bias", None) is not None:
        new.bias = dense.bias
    new.train(dense.training)
    carry_hooks(dense, new)
    return new



def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new``, which replaces ``old``, the forward and backward hooks registered on ``old``.

    A swap must not drop what the user hung on a layer (activation logging, feature extraction,
    gradient hooks): the dicts themselves move, so a hook's handle still removes it. A hook sees
    the new module (a SAS layer's weight is the wide one) and the same inputs and outputs."""
    for name in HOOK_DICTS:
        if name in vars(old):
            setattr(new, name, getattr(old, name))


def carry_model_state(model: nn.Module, built: nn.Module) -> None:
    """Give ``built``, a GraphModule made from a capture of ``model``, what the capture leaves out.

    - The hooks registered on ``model`` itself (a capture records the forward, and a root hook
      runs around it): a forward hook that changes the output, or a pre-hook that changes the
      input, is part of what the model computes. Copies, as ``copy.deepcopy`` makes them: a
      handle from ``model`` removes the hook there only.
    - Which buffers are not persistent: a GraphModule registers every buffer its graph reads as
      persistent, so a ``register_buffer(..., persistent=False)`` one appeared in ``state_dict``
      and a checkpoint without it no longer loaded.
    """
    for name in HOOK_DICTS:
        if name in vars(model):
            setattr(built, name, copy.copy(getattr(model, name)))
    for path, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            try:
                owner = built.get_submodule(path) if path else built
            except AttributeError:
                continue
            if name in owner._buffers:
                owner._non_persistent_buffers_set.add(name)


def _wide_like(dense: torch.Tensor, M: int, fold: bool, rule: str, groups: int,
               transposed: bool = False) -> torch.Tensor:
    """The wide version of a functional call's weight: a Parameter with its requires_grad, or a plain
    tensor (a transposed convolution's widens dim 0)."""
    with torch.no_grad():
        if transposed:
            wide = expand_transposed_weight(dense.detach(), M, fold_relu=fold, rule=rule)
        else:
            wide = expand_dense_weight(dense.detach(), M, fold_relu=fold, rule=rule, groups=groups)
    return nn.Parameter(wide, requires_grad=dense.requires_grad) if isinstance(dense, nn.Parameter) else wide


def _set_tensor(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    if isinstance(value, nn.Parameter):
        owner.register_parameter(name, value)
    else:  # a buffer stays a buffer (and stays out of the optimizer)
        persistent = name not in owner._non_persistent_buffers_set
        owner.register_buffer(name, value, persistent=persistent)


def _emit_sas_call(graph: fx.Graph, layer: LayerPlan, call, x, weight, M: int, rule: str, from_dense: bool,
                   fold: bool, train_dense: bool) -> fx.Node:
    """The ``sas::`` op calls of one layer, written as graph nodes.

    A wide weight's layer calls the op's Python entry point (``sas_linear_call`` /
    ``sas_conv2d_call``: the op's arguments; under ``torch.func`` transforms and forward AD it
    runs the op's composite form, which they can differentiate), a dense weight's the
    ``*_from_dense`` op itself (the backend's graphs, which no transform reaches).

    A convolution's padding is resolved here: ``'same'`` with an odd total padding becomes an
    explicit ``F.pad``; a conv1d runs as a conv2d of height 1 (``unsqueeze`` / ``squeeze`` of
    the activation's dim -2, so an unbatched ``[C, L]`` works too; the op takes the 3-D weight
    itself as the kernel of height 1, since a per-call view of it would miss the op's per-weight
    caches on every call); a conv3d is the same op with its 5-D weight.
    ``from_dense``: the weight is the dense parameter (a dynamo graph input), expanded inside the
    op, which needs a batch dim: an input dynamo recorded as unbatched gets one around the op
    (``sas_conv2d_call`` does that at run time for the wide weight's graphs).
    """
    extra = (fold, rule, train_dense) if from_dense else (rule,)
    if "transpose" in layer.op:  # the op takes any rank and the unbatched form
        op = (torch.ops.sas.conv_transpose_from_dense.default if from_dense
              else sas_transposed.sas_conv_transpose_call)
        example = x.meta.get("example_value") if isinstance(x, fx.Node) else None
        unbatched = from_dense and isinstance(example, torch.Tensor) and example.dim() == len(layer.kernel_size) + 1
        if unbatched:
            x = graph.call_method("unsqueeze", (x, 0))
        out = graph.call_function(op, (x, weight, call.bias, list(call.stride), list(call.padding),
                                       list(call.output_padding), list(call.dilation), call.groups, M, *extra))
        return graph.call_method("squeeze", (out, 0)) if unbatched else out
    if layer.op == "linear":
        op = torch.ops.sas.linear_from_dense.default if from_dense else sas_ops.sas_linear_call
        return graph.call_function(op, (x, weight, call.bias, M, *extra))
    op = torch.ops.sas.conv2d_from_dense.default if from_dense else sas_ops.sas_conv2d_call
    kernel = list(layer.kernel_size)
    example = x.meta.get("example_value") if isinstance(x, fx.Node) else None
    unbatched = from_dense and isinstance(example, torch.Tensor) and example.dim() == len(kernel) + 1
    if unbatched:
        x = graph.call_method("unsqueeze", (x, 0))
    if layer.op == "conv1d":
        stride, dilation = [1, call.stride[0]], [1, call.dilation[0]]
        padding = call.padding if isinstance(call.padding, str) else (0, call.padding[0])
        kernel = [1, *kernel]
        x = graph.call_method("unsqueeze", (x, -2))
    else:
        stride, dilation, padding = list(call.stride), list(call.dilation), call.padding
    padding, pad = sas_ops.resolve_conv_padding(padding, kernel, dilation, stride)
    if pad is not None:
        x = graph.call_function(F.pad, (x, pad))
    out = graph.call_function(op, (x, weight, call.bias, stride, list(padding), dilation, call.groups, M, *extra))
    if layer.op == "conv1d":
        out = graph.call_method("squeeze", (out, -2))
    return graph.call_method("squeeze", (out, 0)) if unbatched else out


def rewrite_layers_to_sas(gm: fx.GraphModule, plan: Plan, config) -> Plan:
    """Rewrite ``gm`` in place: every eligible layer of ``plan`` becomes SAS at ``config.M``.

    ``plan.graph_after`` is set to the rewritten code. ``config.rule`` names the index rule.
    """
    M, rule = config.M, getattr(config, "rule", "sign_pattern")
    nodes: Dict[str, fx.Node] = {n.name: n for n in gm.graph.nodes}
    groups: Dict[str, List[LayerPlan]] = {}
    for layer in plan.eligible():
        groups.setdefault(layer.weight_group or layer.weight_target, []).append(layer)
    # match on this graph (a copy of the analysed one), every site before any module is swapped
    calls = {layer.node: match_layer_call(nodes[layer.node], gm) for layer in plan.eligible()}
    changed = 0
    for group in groups.values():
        fold = group[0].fold_relu
        wide = None  # the one wide weight of this group's dense weight
        built: Dict[int, nn.Module] = {}
        # module calls first: their SAS layer's wide weight then serves the functional calls too
        for layer in sorted(group, key=lambda item: calls[item.node].module is None):
            call = calls[layer.node]
            node = nodes[layer.node]
            current_x = node.args[0] if node.args else node.kwargs["input"]
            x = relu_input(current_x, gm)[0] if layer.fold_relu else current_x
            if call.module is not None:
                if id(call.module) not in built:
                    built[id(call.module)] = sas_module(call.module, M, fold, rule, wide)
                    wide = built[id(call.module)].weight
                    gm.set_submodule(call.module_path, built[id(call.module)])
                node.args = (x, *node.args[1:])
                changed += 1
                continue
            if layer.weight_kind == "attr":
                owner_path, _, pname = layer.weight_target.rpartition(".")
                owner = gm.get_submodule(owner_path) if owner_path else gm
                if wide is None:
                    wide = _wide_like(dense_source(getattr(owner, pname)), M, fold, rule, layer.groups,
                                      "transpose" in layer.op)
                if getattr(owner, pname) is not wide:
                    _set_tensor(owner, pname, wide)
            with gm.graph.inserting_before(node):
                new = _emit_sas_call(gm.graph, layer, call, x, call.weight, M, rule, layer.weight_kind == "placeholder",
                                     fold, bool(getattr(config, "train_dense", False)))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            nodes[layer.node] = new
            changed += 1
    for layer in plan.eligible():
        relu = nodes.get(layer.relu_node) if layer.fold_relu else None
        if relu is None or relu.graph is not gm.graph:
            continue
        if not relu.users:
            gm.graph.erase_node(relu)
            nodes.pop(layer.relu_node)
        elif not (relu.op == "call_function" and relu.target is F.threshold):
            # Other readers keep relu(z). Written as threshold(z, 0, 0), the same values and
            # gradient (0 at z = 0), whose backward reads z, which the SAS layer saves anyway: a
            # ReLU saves its output, a second tensor of z's size kept until the backward. And
            # the SAS layer now reads z too: an in-place ReLU must no longer overwrite it.
            with gm.graph.inserting_before(relu):
                kept = gm.graph.call_function(F.threshold, (relu.args[0], 0.0, 0.0))
            kept.meta.update(relu.meta)
            relu.replace_all_uses_with(kept)
            gm.graph.erase_node(relu)
            nodes[layer.relu_node] = kept
    gm.graph.lint()
    gm.recompile()
    plan.graph_after = gm.code
    log.debug("rewrite_layers_to_sas: %d call sites converted (M=%d)", changed, M)
    return plan


def is_module_swap(plan: Plan) -> bool:
    """Whether the rewrite of ``plan`` is a pure module swap, which a copy of the user's model can take.

    True when every converted call is a call of a conv/linear module and every folded ReLU is
    an ``nn.ReLU`` module that only that call reads (``LayerPlan.relu_module``); a functional
    call or a ReLU a swap cannot bypass changes the graph itself.
    """
    if plan.model is None or plan.capture not in ("symbolic_trace", "export"):
        return False
    return all(layer.module_target is not None and layer.weight_kind != "placeholder"
               and (not layer.fold_relu or layer.relu_module is not None) for layer in plan.eligible())


def swap_sas_modules(model: nn.Module, plan: Plan, config) -> List[str]:
    """Swap the eligible layer modules of ``model`` (a copy) for SAS layers; returns the swapped paths.

    The rewrite of a model that keeps its class (:func:`is_module_swap`; a torch.export
    capture always: its graph cannot be turned back into the user's code). A module
    registered under several names is swapped under all of them; modules sharing one dense
    weight share one wide weight; a folded ``nn.ReLU`` module becomes ``nn.Identity``.
    """
    M, rule = config.M, getattr(config, "rule", "sign_pattern")
    paths: Dict[int, List[str]] = defaultdict(list)
    for path, mod in model.named_modules(remove_duplicate=False):
        paths[id(mod)].append(path)
    # every module is looked up before the first swap changes any path
    eligible = [(layer, model.get_submodule(layer.module_target)) for layer in plan.eligible()
                if layer.module_target is not None]
    relus = [model.get_submodule(layer.relu_module) for layer in plan.eligible()
             if layer.fold_relu and layer.relu_module is not None]
    built: Dict[int, nn.Module] = {}
    wide: Dict[int, nn.Parameter] = {}
    swapped: List[str] = []
    for layer, dense in eligible:
        if id(dense) in built:
            continue
        # one wide weight per dense weight tensor, whatever the captures named it (a dynamo
        # capture names a weight per graph)
        key = id(dense.weight)
        built[id(dense)] = new = sas_module(dense, M, layer.fold_relu, rule, wide.get(key),
                                            weight_in_out=layer.weight_in_out)
        wide.setdefault(key, new.weight)
        for path in paths[id(dense)]:
            model.set_submodule(path, new)
            swapped.append(path)
    for relu in relus:
        if id(relu) in built:
            continue
        # exact: this ReLU's one call feeds only the SAS layer, which now reads its input
        built[id(relu)] = identity = nn.Identity().train(relu.training)
        for path in paths[id(relu)]:
            model.set_submodule(path, identity)
            swapped.append(path)
    return swapped


def keep_module_swaps(plan: Plan, why: str) -> str:
    """Narrow ``plan`` to what module swaps express, because a traced graph of this model is not
    the model (``why``: it does not compute its function in both modes, or it drops its
    checkpointing): a ReLU that only a graph rewrite can fold stays where it is (the layer
    projects its output), and a functional layer stays dense. Returns what changed, as a sentence."""
    name = type(plan.model).__name__
    changed, dense_groups = [], set()
    for layer in plan.eligible():
        if layer.module_target is None or layer.weight_kind == "placeholder":
            layer.eligible = False
            layer.reason = (f"a functional {layer.op} on a parameter: converting it rewrites {name}'s graph, "
                            f"and a graph of {name} is not {name}: {why}")
            dense_groups.add(layer.weight_group or layer.weight_target)
            changed.append(f"{layer.name} (stays dense)")
        elif layer.fold_relu and layer.relu_module is None:
            layer.fold_relu, layer.relu_node = False, None
            layer.fold_relu_reason = (f"folding this ReLU rewrites {name}'s graph, and a graph of {name} is not "
                                      f"{name}: {why}")
            changed.append(f"{layer.name} (its ReLU not folded)")
    for layer in plan.eligible():  # a weight shared with a layer that stays dense stays dense too
        if (layer.weight_group or layer.weight_target) in dense_groups:
            layer.eligible = False
            layer.reason = "its weight is shared with a functional call that stays dense"
            changed.append(f"{layer.name} (stays dense)")
    if not is_module_swap(plan):  # every cause above is handled: this is a bug, not the user's
        raise AssertionError(f"the SAS plan of {name} is still not a module swap after narrowing it")
    return (f"{why}; the conversion keeps your class and forward (module swaps), which leaves "
            f"{', '.join(changed)}")
