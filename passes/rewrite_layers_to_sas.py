"""Rewrite: every eligible conv/linear of the plan becomes a SAS layer, function-preserving.

Why: this is the one place a graph changes. Module calls get their module swapped for a
``SASLinear``/``SASConv{1,2}d`` built by ``from_dense``; functional calls on a parameter get
the parameter replaced by its wide version and the call replaced by the ``sas::`` op; on a
dynamo graph (weights are graph inputs) the call becomes ``sas::linear_from_dense`` /
``sas::conv2d_from_dense``, which expand the live dense parameter once per version (cached,
so the compiled model never serves a stale copy and never re-expands per call). The graph
holds ops only. A folded ReLU is bypassed for the SAS layer only; it is erased when nothing
else reads it.
"""
from __future__ import annotations

import logging
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import fx, nn

from sas_compile.runtime import sas_ops
from sas_compile.runtime.layers import SASConv1d, SASConv2d, SASLinear
from sas_compile.runtime.projection import expand_dense_weight

from .find_foldable_relus import relu_input
from .find_sas_layers import match_layer_call
from .plan import LayerPlan, Plan

log = logging.getLogger("sas_compile.passes")

__all__ = ["rewrite_layers_to_sas", "swap_sas_modules", "sas_module", "set_submodule"]


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def sas_module(dense: nn.Module, M: int, fold: bool, rule: str) -> nn.Module:
    """The SAS layer computing the same function as ``dense`` (``dense(relu(x))`` if folded)."""
    if isinstance(dense, nn.Linear):
        return SASLinear.from_dense(dense, M, fold_relu=fold, rule=rule)
    if isinstance(dense, nn.Conv2d):
        return SASConv2d.from_dense(dense, M, fold_relu=fold, rule=rule)
    if isinstance(dense, nn.Conv1d):
        return SASConv1d.from_dense(dense, M, fold_relu=fold, rule=rule)
    raise TypeError(f"no SAS layer for {type(dense).__name__}")


def _emit_sas_call(graph: fx.Graph, layer: LayerPlan, call, x, weight, M: int, rule: str, from_dense: bool,
                   fold: bool, train_dense: bool) -> fx.Node:
    """The ``sas::`` op calls of one layer, written as graph nodes (ops only, no Python helpers).

    A convolution's padding is resolved here: ``'same'`` with an odd total padding becomes an
    explicit ``F.pad``; a conv1d runs as a conv2d of height 1 (``unsqueeze`` / ``squeeze``).
    ``from_dense``: the weight is the dense parameter (a dynamo graph input), expanded inside the op.
    """
    extra = (fold, rule, train_dense) if from_dense else (rule,)
    if layer.op == "linear":
        op = torch.ops.sas.linear_from_dense.default if from_dense else torch.ops.sas.linear.default
        return graph.call_function(op, (x, weight, call.bias, M, *extra))
    op = torch.ops.sas.conv2d_from_dense.default if from_dense else torch.ops.sas.conv2d.default
    kernel = list(layer.kernel_size)
    if layer.op == "conv1d":
        stride, dilation = [1, call.stride[0]], [1, call.dilation[0]]
        padding = call.padding if isinstance(call.padding, str) else (0, call.padding[0])
        kernel = [1, *kernel]
        x = graph.call_method("unsqueeze", (x, 2))
        weight = graph.call_method("unsqueeze", (weight, 2))
    else:
        stride, dilation, padding = list(call.stride), list(call.dilation), call.padding
    padding, pad = sas_ops.resolve_conv_padding(padding, kernel, dilation, stride)
    if pad is not None:
        x = graph.call_function(F.pad, (x, pad))
    out = graph.call_function(op, (x, weight, call.bias, stride, list(padding), dilation, call.groups, M, *extra))
    return graph.call_method("squeeze", (out, 2)) if layer.op == "conv1d" else out


def rewrite_layers_to_sas(gm: fx.GraphModule, plan: Plan, config) -> Plan:
    """Rewrite ``gm`` in place: every eligible layer of ``plan`` becomes SAS at ``config.M``.

    ``plan.graph_after`` is set to the rewritten code. ``config.rule`` names the index rule.
    """
    M, rule = config.M, getattr(config, "rule", "sign_pattern")
    nodes: Dict[str, fx.Node] = {n.name: n for n in gm.graph.nodes}
    groups: Dict[str, List[LayerPlan]] = {}
    for layer in plan.eligible():
        groups.setdefault(layer.weight_target, []).append(layer)
    # match on this graph (a copy of the analysed one), every site before any module is swapped
    calls = {layer.node: match_layer_call(nodes[layer.node], gm) for layer in plan.eligible()}
    changed = 0
    for target, group in groups.items():
        fold = group[0].fold_relu
        kind = group[0].weight_kind
        if kind == "attr":
            owner_path, _, pname = target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            dense_weight = getattr(owner, pname)
            with torch.no_grad():
                wide = expand_dense_weight(dense_weight.detach(), M, fold_relu=fold, rule=rule, groups=group[0].groups)
            owner.register_parameter(pname, nn.Parameter(wide, requires_grad=dense_weight.requires_grad))
        swapped = set()
        for layer in group:
            call = calls[layer.node]
            node = nodes[layer.node]
            current_x = node.args[0] if node.args else node.kwargs["input"]
            x = relu_input(current_x, gm)[0] if layer.fold_relu else current_x
            if call.module is not None:
                if call.module_path not in swapped:
                    set_submodule(gm, call.module_path, sas_module(call.module, M, fold, rule))
                    swapped.add(call.module_path)
                node.args = (x, *node.args[1:])
            else:
                with gm.graph.inserting_before(node):
                    new = _emit_sas_call(gm.graph, layer, call, x, call.weight, M, rule, kind == "placeholder", fold,
                                         bool(getattr(config, "train_dense", False)))
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
        elif relu_input(relu, gm)[1]:
            # the SAS layer now reads z too: an in-place ReLU must no longer overwrite it
            with gm.graph.inserting_before(relu):
                out_of_place = gm.graph.call_function(torch.relu, (relu.args[0],))
            out_of_place.meta.update(relu.meta)
            relu.replace_all_uses_with(out_of_place)
            gm.graph.erase_node(relu)
            nodes[layer.relu_node] = out_of_place
    gm.graph.lint()
    gm.recompile()
    plan.graph_after = gm.code
    log.debug("rewrite_layers_to_sas: %d call sites converted (M=%d)", changed, M)
    return plan


def swap_sas_modules(model: nn.Module, plan: Plan, config) -> List[str]:
    """Swap the eligible layer modules of ``model`` (a copy) for SAS layers; returns their paths.

    The rewrite of a torch.export capture: the graph cannot be turned back into the user's
    code, but its nn.Linear / nn.Conv modules can be replaced, so the model keeps its class.
    """
    swapped: List[str] = []
    for layer in plan.eligible():
        path = layer.module_target
        if path is None or path in swapped:
            continue
        set_submodule(model, path, sas_module(model.get_submodule(path), config.M, layer.fold_relu,
                                              getattr(config, "rule", "sign_pattern")))
        swapped.append(path)
    return swapped
