"""SWS: the paper's baseline, a sqrt(M)-wide network with 1:M sparse weights (the user functions).

``swsify(model, M=...)`` captures the model so that every layer is visible
(``passes/capture.py``), ties its widths across the whole graph
(``passes/tie_channel_widths.py``), rebuilds it sqrt(M) times wider with fresh default
initialisation and puts a 1:M mask on the weight of every widened conv/linear (Linear,
Conv1d-3d, ConvTranspose1d-3d; ``passes/widen_for_sws.py``). The mult count then stays close to the base
model's, which is the comparison the paper makes against SAS at the same mult budget.
``lower_sws(model)`` puts its masked linears on the packed weight and the SWS kernel
(``passes/lower_sws_to_packed.py``); ``measure_sws_model`` counts what a built model costs and
``export_sws_weights`` packs its masked weights. This file holds only those user functions.

Like ``sasify``, ``dense_input_layers=True`` (the default) keeps the weight of a layer that
reads the raw network input dense: its output width widens, but it has no mask (a first
conv with one input channel would otherwise keep one of every M kernel taps), so SAS and
SWS treat that layer the same way.

The 1:M pattern
---------------
The weight is viewed row-major as ``[out, in/groups * kernel]`` (``kh * kw`` for conv2d,
``k`` for conv1d) and flattened; every chunk
of M consecutive weights keeps exactly one, the largest magnitude, and a last partial
chunk keeps one (a transposed convolution's ``[in, out/groups, *kernel]`` weight is masked
in that same ``[out, in/groups * kernel]`` view, so its chunks run along the channels it
sums over). This gives the paper's count ``ceil(in * out / M)`` exactly; when
``fan_in % M != 0`` a chunk may straddle two rows (such a layer cannot be packed into
2:4 rows; ``export_sws_weights`` says so). The mask is recomputed every forward in training
with a straight-through gradient (the dense weight gets the gradient of the masked one),
so masks follow weight updates; ``freeze_mask=True`` computes it once, at build, keeps it in
the state_dict (a reloaded checkpoint computes with the mask it was trained with) and trains
only the kept weights. In eval mode, without autograd, the masked weight is cached until the weight
changes or the model goes back to training.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import fx, nn

from .api import FilterFn, attach_result, check_filter_fn, register_handler, sparsify
from .passes.capture import (CaptureError, capture_seeing_into_leaves, copy_model, normalize_example_inputs,
                             propagate_shapes, trainable_export_graph)
from .passes.find_sas_layers import (LAYER_MODULES, TRANSPOSED_CONV_MODULES, layer_plan_from_module, match_layer_call,
                                     op_name, parameter_holders)
from .passes.lower_sws_to_packed import PackedSWSLinear, lower_sws_to_packed
from .passes.mode_flags import bind_mode_values, export_modes, trace_modes
from .passes.sws_module_swaps import graph_signature, same_outputs, swap_into_model, tied_parameter_paths
from .passes.sws_width_rules import has_width_rule
from .passes.tie_channel_widths import tie_channel_widths
from .passes.widen_for_sws import widen_for_sws
from .runtime.packing import pack_sws_weight
from .passes.plan import LayerPlan, Plan
from .passes.rewrite_layers_to_sas import carry_model_state
from .runtime.projection import check_M
from .runtime.sws_mask import OneOfMMask, one_of_m_mask, sws_mask_of
from .sas import existing_sas_layers

log = logging.getLogger("sas_compile")

__all__ = [
    "swsify",
    "SWSConfig",
    "lower_sws",
    "OneOfMMask",
    "one_of_m_mask",
    "measure_sws_model",
    "export_sws_weights",
]


def _build_sws(model: nn.Module, config: "SWSConfig", example_inputs
               ) -> Tuple[nn.Module, fx.GraphModule, str]:
    """The SWS model :func:`swsify` documents, the widened graph it was built from (the model itself
    where that is the result) and how the model was captured (the arguments were checked by
    ``SWSConfig`` and ``sparsify``)."""
    sas_layers = existing_sas_layers(model)
    if sas_layers:
        raise ValueError(
            f"swsify: {type(model).__name__} already has SAS layers: {', '.join(sas_layers)}. SWS is the "
            "baseline built from a dense model (sqrt(M) times wider, 1:M masked weights); a SAS layer's wide "
            "weight and projection have no SWS equivalent. Call swsify on the dense model instead."
        )
    example_inputs = normalize_example_inputs(example_inputs)
    # the width analysis must see inside every layer: export when tracing leaves opaque ones
    source = copy_model(model)
    try:
        captured = capture_seeing_into_leaves(source, example_inputs, sees_into=has_width_rule)
    except CaptureError as error:
        if not hasattr(error, "why"):  # no example_inputs: the error says to pass them
            raise
        # sasify and report fall back to dynamo's graphs; SWS cannot: it rebuilds the network wider
        raise CaptureError(
            f"swsify needs {type(model).__name__} as one graph: SWS widens every layer and everything between "
            f"them (norms, reshapes, attention heads), which only a whole-network graph shows, and {error.why}. "
            "sasify and report handle such a model (they capture it with dynamo, graph by graph); for swsify, "
            "wrap the model in a module whose forward torch.export can capture (e.g. a transformers model "
            "called with use_cache=False, returning tensors only)."
        ) from error
    # the capture took self.training as a constant: values passed to calls are read at run time
    # (bind_mode_values); a branch on it cannot be one graph
    if captured.method == "export":
        modes = export_modes(captured.gm, source, captured.example_inputs)
    else:
        modes = trace_modes(captured.gm, source)
    gm = trainable_export_graph(captured.gm) if captured.method == "export" else captured.gm
    bind_mode_values(gm, modes.bindings)
    # a traced graph without branches on self.training may go back into the traced copy as swaps
    swappable = modes.why is None or modes.only_grad_switches  # the user's forward keeps its switches
    before = graph_signature(gm) if captured.method == "symbolic_trace" and swappable else None
    widths = tie_channel_widths(gm, config.M, example_inputs, filter_fn=config.filter_fn,
                                dense_input_layers=config.dense_input_layers, model=model)
    widen_for_sws(gm, widths, freeze_mask=config.freeze_mask)
    why = ("torch.export captured it (symbolic tracing could not), and an export graph calls aten ops on its parameters, "
           "not your modules" if captured.method == "export" else modes.why)
    if before is not None:
        why = swap_into_model(gm, source, before, gm.sws_layers, tied_parameter_paths(model))
        if why is None:
            why = _check_swapped(gm, source, example_inputs, model)
        if why is None:
            order = [node.name for node in gm.graph.nodes if node.name in gm.sws_layers]  # call order
            source.sws_widths, source.sws_M = gm.sws_widths, gm.sws_M
            source.sws_layers = {name: gm.sws_layers[name] for name in order}
            source.sws_module_swaps = True
            return source, gm, captured.method
    _warn_graph_result(model, modes, why, exported=captured.method == "export")
    gm.train(model.training)
    carry_model_state(model, gm)
    if example_inputs is not None:
        _check_runs(gm, example_inputs, model)
    return gm, gm, captured.method


def _warn_graph_result(model: nn.Module, modes, why: Optional[str], *, exported: bool) -> None:
    """Say why the SWS model is a GraphModule and what of the user's forward it does not keep (a
    warning where the user can change that; for a torch.export capture, where nothing can, an INFO)."""
    if modes.why is not None and not modes.mode_paths:
        log.warning("swsify: %s: %s. SWS rebuilds the network from one captured graph, which cannot hold that: "
                    "the SWS model differs from the model there", type(model).__name__, modes.why)
    elif modes.why is not None:
        mode = "training" if model.training else "eval"
        other = "eval" if model.training else "training"
        log.warning(
            "swsify: %s: %s. SWS rebuilds the network from one captured graph, so the SWS model takes the %s-mode "
            "paths in both modes (it was converted in %s mode); values passed to calls that both modes make "
            "alike, such as dropout flags, still follow .train()/.eval(). To have the %s-mode paths instead "
            "(a branch such as stochastic depth is then taken in both modes or in neither), convert the model "
            "in %s mode", type(model).__name__, modes.why, mode, mode, other, other)
    if modes.checkpointed:
        log.warning("swsify: the SWS model of %s runs without the torch.utils.checkpoint calls of its forward "
                    "(in %s): a traced graph inlines them, so training keeps every activation they free",
                    type(model).__name__, ", ".join(p or "the root" for p in modes.checkpointed))
    if (modes.why is None or modes.only_grad_switches) and not isinstance(model, fx.GraphModule):
        (log.info if exported else log.warning)(
            "swsify: the result is a torch.fx.GraphModule running the captured graph, not %s (indexing, its "
            "containers and its own methods are not on it): %s%s", type(model).__name__, why,
            "" if exported else ". Layers called as modules and reshapes written with -1 or x.shape keep your class")


def _check_swapped(gm: fx.GraphModule, swapped: nn.Module, example_inputs, model: nn.Module) -> Optional[str]:
    """Why the user's forward on the swapped modules is not the widened graph, or None: both run on
    ``example_inputs`` in eval mode from one random seed and must give equal outputs."""
    if example_inputs is None:
        return None
    inputs = [t for t in torch.utils._pytree.tree_leaves(example_inputs) if isinstance(t, torch.Tensor)]
    devices = sorted({t.device.index or 0 for t in [*swapped.parameters(), *inputs] if t.is_cuda})
    outputs = []
    with _in_eval(gm, swapped), torch.no_grad():
        # forward itself: the root's hooks are the copy's (and the graph's once carried), not the graph's
        for module in (gm, swapped):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(0)
                try:
                    outputs.append(module.forward(*example_inputs))
                except Exception as err:
                    if module is gm:
                        raise _does_not_run(model, err) from err
                    return f"its own forward fails on the widened modules ({type(err).__name__}: {err})"
    if not same_outputs(*outputs):
        return "its own forward on the widened modules does not give the widened graph's outputs"
    return None


def lower_sws(model: nn.Module, *, target: str = "auto", inplace: bool = False) -> nn.Module:
    """An ``swsify``-built model whose masked linears run ``sws_matmul`` on their packed 1:M weight.

    For inference: each mask is read once, now (the mask of the current weights, or the frozen
    one with ``freeze_mask=True``), and the packed weights are buffers that do not train.
    ``target`` ("auto" | "cpu" | "cuda" | "emulator", see ``runtime.matmul``) is kept on each
    packed layer (``layer.target``, changeable later). Convolutions, layers whose rows do not
    fit 2:4 (``fan_in % M != 0``) and dense layers stay as they are; ``result.sws_lowering``
    lists every layer with what happened to it (``passes/lower_sws_to_packed.py``). ``model``
    is copied unless ``inplace``; the result keeps its class (the user's, where ``swsify`` kept
    it: there every masked ``nn.Linear`` is swapped for its packed module).
    """
    if getattr(model, "sws_layers", None) is None:
        raise ValueError(f"lower_sws: expected a model built by sas_compile.swsify, got {type(model).__name__}")
    out = model if inplace else _copy(model)
    lower_sws_to_packed(out, target=target)
    return out


def _copy(model: nn.Module) -> nn.Module:
    out = copy_model(model)  # also a GraphModule whose own weights are masked (register_mask's deepcopy)
    # GraphModule's deepcopy keeps only its own attributes: carry what swsify recorded
    out.sws_widths, out.sws_M, out.sws_layers = model.sws_widths, model.sws_M, dict(model.sws_layers)
    out.sws_module_swaps = getattr(model, "sws_module_swaps", False)
    return out


def _check_runs(gm, example_inputs, model) -> None:
    try:
        with _in_eval(gm), torch.no_grad():
            gm(*example_inputs)
    except Exception as err:
        raise _does_not_run(model, err) from err


def _does_not_run(model: nn.Module, err: Exception) -> RuntimeError:
    return RuntimeError(f"swsify: the widened {type(model).__name__} does not run on example_inputs ({err}). "
                        "Exclude the layers around the failing op with filter_fn, and please report the model.")


@contextlib.contextmanager
def _in_eval(*models: nn.Module):
    """The models in eval mode, every module's own flag restored afterwards (a mask's as a mask's)."""
    modes = {m: m.training for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for m, t in modes.items():
            m.train(t) if isinstance(m, OneOfMMask) else setattr(m, "training", t)


def _owner_of(gm: nn.Module, target: str):
    parent, _, attr = target.rpartition(".")
    return (gm.get_submodule(parent) if parent else gm), attr


def measure_sws_model(model_or_layer: nn.Module, example_inputs=None) -> Dict[str, Dict[str, Any]]:
    """Widths, nonzeros and mults of the conv/linear layers of a built SWS model, counted from the model.

    Keys are the layers' node names in the swsify'd graph (or ``""`` for a single layer).
    Per layer: ``name`` (the module path), ``in_channels``, ``out_channels``, ``fan_in``
    (weights per output; also under its older key ``in_features``), ``out_features``,
    ``groups``, ``weight_numel``, ``nonzeros`` (counted from the live mask, or the mask a
    lowered layer was packed with; all weights when the layer is dense),
    ``mults_per_position`` (== nonzeros), ``sparse``; with ``example_inputs`` also
    ``positions`` and ``mults``. Counted from the built model, not from the analysis, so it
    checks what ``report`` predicts (``accounting.sws_costs`` is the formula).
    """
    if isinstance(model_or_layer, LAYER_MODULES):
        return {"": _layer_costs(model_or_layer, "weight", model_or_layer)}
    layers = getattr(model_or_layer, "sws_layers", None)
    if layers is None:
        raise ValueError(
            "measure_sws_model: expected a model built by sas_compile.swsify (or one nn.Conv1d/2d/3d, "
            "nn.ConvTranspose1d/2d/3d or nn.Linear), "
            f"got {type(model_or_layer).__name__}"
        )
    positions = _positions(model_or_layer, example_inputs) if example_inputs is not None else {}
    out = {}
    for node_name, target in layers.items():
        owner, attr = _owner_of(model_or_layer, target)
        costs = _layer_costs(owner, attr, _graph_layer(model_or_layer, node_name))
        source = owner.source if isinstance(owner, PackedSWSLinear) else target  # lowered: the weight it packs
        costs["name"] = source[: -len(".weight")] if source.endswith(".weight") else source
        if node_name in positions:
            costs["positions"] = positions[node_name]
            costs["mults"] = positions[node_name] * costs["nonzeros"]
        out[node_name] = costs
    return out


def _graph_layer(model, node_name):
    """The layer of ``node_name``: its module, or the graph node of a functional call."""
    if getattr(model, "sws_module_swaps", False):  # the user's class: every layer is a module
        return model.get_submodule(model.sws_layers[node_name].rpartition(".")[0])
    for node in model.graph.nodes:
        if node.name == node_name:
            if node.op == "call_module":
                return model.get_submodule(node.target)
            return node
    return None


def _transposed_call(layer) -> bool:
    """Whether ``layer`` (a module or a graph call) is a transposed convolution."""
    if isinstance(layer, nn.Module):
        return isinstance(layer, TRANSPOSED_CONV_MODULES)
    return isinstance(layer, fx.Node) and op_name(layer).startswith("conv_transpose")


def _layer_costs(owner: nn.Module, attr: str, layer) -> Dict[str, Any]:
    weight = getattr(owner, attr)
    mask = sws_mask_of(owner, attr)
    numel = weight.numel()
    if isinstance(layer, LAYER_MODULES) and not isinstance(layer, nn.Linear):
        groups, in_channels, out_features = layer.groups, layer.in_channels, layer.out_channels
    elif isinstance(layer, nn.Linear):
        groups, in_channels, out_features = 1, layer.in_features, layer.out_features
    elif isinstance(layer, fx.Node) and weight.dim() in (3, 4, 5):  # F.conv*d / F.conv_transpose*d
        # (input, weight, bias, stride, padding, dilation | output_padding, groups, ...): groups is
        # argument 6 of both, the widened one (a depthwise conv's follows its width)
        groups = layer.args[6] if len(layer.args) > 6 else layer.kwargs.get("groups", 1)
        if _transposed_call(layer):  # stored [in, out/groups, *kernel]
            in_channels, out_features = weight.shape[0], weight.shape[1] * groups
        else:
            in_channels, out_features = weight.shape[1] * groups, weight.shape[0]
    else:
        groups, in_channels, out_features = 1, weight.shape[1], weight.shape[0]
    fan_in = numel // out_features if out_features else 0
    if isinstance(owner, PackedSWSLinear):  # lowered: the mask it was packed with
        nonzeros, sparse = owner.kept, True
    else:
        nonzeros = int(mask.mask(getattr(owner.parametrizations, attr).original).sum()) if mask is not None else numel
        sparse = mask is not None
    return {
        "in_channels": int(in_channels), "out_channels": int(out_features), "fan_in": int(fan_in),
        "in_features": int(fan_in), "out_features": int(out_features), "groups": int(groups),
        "weight_numel": int(numel), "nonzeros": nonzeros, "mults_per_position": nonzeros, "sparse": sparse,
    }


def _positions(model, example_inputs) -> Dict[str, int]:
    """Output positions (all dims but the channel one) of every layer, from one shape pass."""
    inputs = normalize_example_inputs(example_inputs)
    shapes = _shapes_by_hooks(model, inputs) if getattr(model, "sws_module_swaps", False) else _graph_shapes(model, inputs)
    out = {}
    for name, shape in shapes.items():
        wdim = getattr(*_owner_of(model, model.sws_layers[name])).dim()
        is_conv = wdim >= 3 and len(shape) >= wdim - 1
        dims = list(shape)
        # a conv's channel dim precedes its spatial dims (-4 for conv3d, -3 for conv2d, -2 for conv1d)
        del dims[-(wdim - 1) if is_conv else -1]
        n = 1
        for d in dims:
            n *= int(d)
        out[name] = n
    return out


def _graph_shapes(gm: fx.GraphModule, inputs) -> Dict[str, tuple]:
    """Per layer node, the shape its mults are counted on, from a shape pass over the graph."""
    propagate_shapes(gm, inputs, run_for_real=True)
    out = {}
    for node in gm.graph.nodes:
        if node.name in gm.sws_layers:
            layer = gm.get_submodule(node.target) if node.op == "call_module" else node
            # a transposed convolution multiplies per input position (passes/costs.py)
            counted = node.args[0] if _transposed_call(layer) else node
            out[node.name] = tuple(counted.meta["tensor_meta"].shape)
    return out


def _shapes_by_hooks(model: nn.Module, inputs) -> Dict[str, tuple]:
    """:func:`_graph_shapes` for an SWS model of the user's class: forward hooks on its layer modules,
    whose calls come in the order of ``sws_layers`` (the captured graph's order)."""
    calls: Dict[str, list] = {}
    for name, target in model.sws_layers.items():
        calls.setdefault(target.rpartition(".")[0], []).append(name)
    seen: Dict[str, list] = {path: [] for path in calls}
    handles = []
    for path in calls:
        module = model.get_submodule(path)
        transposed = isinstance(module, TRANSPOSED_CONV_MODULES)  # counted per input position

        def record(mod, args, output, path=path, transposed=transposed):
            seen[path].append(tuple((args[0] if transposed else output).shape))
        handles.append(module.register_forward_hook(record))
    try:
        with _in_eval(model), torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for path, names in calls.items():
        if len(seen[path]) != len(names):
            raise ValueError(f"measure_sws_model: {path or 'the root'} ran {len(seen[path])} time(s) on example_inputs, "
                             f"where the SWS model was built with {len(names)} call(s) of it ({', '.join(names)})")
        out.update(zip(names, seen[path]))
    return {name: out[name] for name in model.sws_layers}


def export_sws_weights(model: nn.Module, *, strict: bool = True) -> Dict[str, Any]:
    """Pack every masked weight of a built SWS model into the runtime's 2:4 format.

    Returns ``{layer node name: PackedSparseWeight}`` (``sas_compile.runtime.packing``) of the
    masked weight viewed as ``[out, in/groups * kernel]`` (conv1d ``[out, in*k]``, conv2d
    ``[out, in*kh*kw]``; a transposed convolution's ``[in, out/groups, *kernel]`` weight rearranged
    into that view, as its mask chunks it); dense layers (no mask) are left out: 1:2 is a valid 2:4 pattern and 1:4
    is stored as 2:4 with explicit zeros. A layer whose 1:M chunks straddle rows
    (``fan_in % M != 0``) cannot be packed: ``strict`` raises a ValueError naming it,
    ``strict=False`` leaves it out. A layer :func:`lower_sws` packed gives its packed weight.
    """
    layers = getattr(model, "sws_layers", None)
    if layers is None:
        raise ValueError("export_sws_weights: expected a model built by sas_compile.swsify")
    M = model.sws_M
    out = {}
    for node_name, target in layers.items():
        owner, attr = _owner_of(model, target)
        if isinstance(owner, PackedSWSLinear):
            out[node_name] = owner.packed_weight()
            continue
        if sws_mask_of(owner, attr) is None:
            continue
        with torch.no_grad():
            # a transposed convolution's weight in the [out, in/groups, *kernel] view its mask chunks
            weight = sws_mask_of(owner, attr).conv_layout(getattr(owner, attr).detach())
        flat = weight.reshape(weight.shape[0], -1)
        if flat.shape[1] % M:
            if strict:
                raise ValueError(
                    f"export_sws_weights: layer {node_name} ({target}) has {flat.shape[1]} weights per "
                    f"row, not a multiple of M={M}: its 1:{M} chunks straddle rows and do not fit 2:4 "
                    "rows. Pass strict=False to leave it out, or exclude it with swsify's filter_fn."
                )
            continue
        out[node_name] = pack_sws_weight(flat.contiguous(), M)
    return out


@dataclass(frozen=True)
class SWSConfig:
    """Options of the SWS baseline (``swsify``): M, the input-layer policy, frozen masks, the filter."""

    M: int = 2
    dense_input_layers: bool = True
    freeze_mask: bool = False
    filter_fn: Optional[FilterFn] = None

    def __post_init__(self):
        check_M(self.M)
        check_filter_fn(self.filter_fn, "swsify: filter_fn")


@register_handler(SWSConfig)
def _convert(model: nn.Module, config: SWSConfig, example_inputs) -> nn.Module:
    built, gm, capture_method = _build_sws(model, config, example_inputs)
    holders = parameter_holders(built)
    layers = []
    for node_name, w in built.sws_widths.layers.items():
        target = built.sws_layers[node_name]
        name = target[: -len(".weight")] if target.endswith(".weight") else target
        tied = next((group for group in holders.values() if target in group), [target])
        layers.append(LayerPlan(name, node_name, w.op, bool(w.sparse), w.reason, w.in_channels, w.out_channels,
                                tuple(w.kernel_size), groups=w.groups,
                                has_bias=built.sws_widths.layer_params[node_name][1] is not None, weight_target=target,
                                weight_group=tied[0], shared_with=tuple(t for t in tied if t != target),
                                sws_M=config.M if w.sparse else None))
    for node_name, why in built.sws_widths.unfollowed.items():  # conv/linear calls left as they are
        layers.append(_unfollowed_layer(gm, node_name, f"not widened: the width analysis cannot follow this "
                                                          f"call ({why}); its widths stay"))
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    layers.sort(key=lambda layer: order.get(layer.node, len(order)))
    if layers and not any(layer.eligible for layer in layers):
        reasons = sorted({layer.reason for layer in layers if layer.reason})
        hint = "" if example_inputs is not None else " (without example_inputs; they give the analysis its shapes)"
        log.warning("swsify(M=%d): none of the %d conv/linear layers carries a 1:M mask%s; see .sparsify_plan: %s",
                    config.M, len(layers), hint, "; ".join(reasons))
    return attach_result(built, config, Plan(layers=layers, capture=capture_method, M=config.M, technique="SWS"))


def _unfollowed_layer(gm: fx.GraphModule, node_name: str, reason: str) -> LayerPlan:
    """The plan entry of a conv/linear call the width analysis could not follow (it stays as it is)."""
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    if node.op == "call_module":
        return layer_plan_from_module(node.target, node_name, gm.get_submodule(node.target), False, reason)
    call = match_layer_call(node, gm)
    return LayerPlan(node_name, node_name, call.op, False, reason, 0, 0)



def swsify(
    model: nn.Module,
    *,
    M: int = 2,
    example_inputs=None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    freeze_mask: bool = False,
    dense_input_layers: bool = True,
) -> nn.Module:
    """Build the SWS baseline of ``model``: sqrt(M) times wider, 1:M sparse weights.

    ``sparsify(model, SWSConfig(M=M, ...), filter_fn=..., example_inputs=...)``; ``model`` is
    not modified. ``example_inputs`` (a tensor, tuple or dict of keyword inputs) gives exact
    shapes and lets models that ``symbolic_trace`` cannot trace be captured with
    ``torch.export``; the built model is
    run on them once as a check. ``filter_fn(module, fqn) -> bool`` keeps a conv/linear out of
    SWS (its widths stay, its weight stays dense) when it returns False; it sees the modules of
    ``model`` itself, as in ``sasify``, and is asked about input layers too. ``dense_input_layers``
    (default True, as ``sasify``) keeps the weight of a layer reading the raw network input
    dense (no mask) while its output width still widens; False masks it 1:M like the others.
    Every module or parameter whose shape changes is freshly initialised (layer defaults),
    keeping the ``requires_grad``, dtype and device of the one it replaces; the rest are
    copies of the original's. Weights that were one Parameter (tied) widen as one and stay
    one Parameter. With ``freeze_mask`` the masks are frozen now and saved in the state_dict.
    A model that already has SAS layers is refused (ValueError naming them).

    The result is ``model``'s own class (a copy with the widened modules and parameters
    swapped in, ``sws_module_swaps`` True: indexing, containers, its methods and its own
    forward keep working) whenever the widening changes nothing in the traced graph but
    modules and parameters (a ``symbolic_trace`` capture without branches on
    ``self.training`` or ``torch.is_grad_enabled()``, every layer a module, no reshape naming a
    width; ``torch.no_grad()`` blocks and checkpoint calls stay in the forward) and, given
    ``example_inputs``, the copy's forward gives the widened graph's outputs on them. Otherwise
    it is a GraphModule of the captured graph, and a warning says why. Either way its
    ``sws_widths`` attribute holds the width analysis, ``sws_layers`` maps each layer's node
    name in that graph to its weight, and ``sparsify_plan`` lists the layers (sparse or why
    not). For inference on the sparse kernels, :func:`lower_sws` it.
    """
    config = SWSConfig(M=M, freeze_mask=freeze_mask, dense_input_layers=bool(dense_input_layers))
    return sparsify(model, config, filter_fn=filter_fn, example_inputs=example_inputs)
