"""Rewrite: every eligible conv/linear of the plan becomes a SAS layer, function-preserving.

Why: this is the one place a graph changes. Module calls get their module swapped for a
``SASLinear``/``SASConv{1,2}d`` built by ``from_dense``; functional calls on a parameter get
the parameter replaced by its wide version and the call replaced by the ``sas::`` op; on a
dynamo graph (weights are graph inputs) the wide weight is computed in the graph from the
live parameter, so the compiled model never serves a stale copy. A folded ReLU is bypassed
for the SAS layer only; it is erased when nothing else reads it.
"""
from __future__ import annotations

import logging
from typing import Dict, List

import torch
from torch import fx, nn

from sas_compile.layers import SASConv1d, SASConv2d, SASLinear
from sas_compile.plan import LayerPlan, Plan
from sas_compile.runtime import sas_ops
from sas_compile.runtime.projection import expand_dense_weight

from .find_sas_layers import match_layer_call
from .fold_relu_into_projection import relu_input

log = logging.getLogger("sas_compile.passes")

__all__ = ["rewrite_layers_to_sas", "RULE"]

RULE = "sign_pattern"


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def _sas_module(dense: nn.Module, M: int, fold: bool) -> nn.Module:
    if isinstance(dense, nn.Linear):
        return SASLinear.from_dense(dense, M, fold_relu=fold, rule=RULE)
    if isinstance(dense, nn.Conv2d):
        return SASConv2d.from_dense(dense, M, fold_relu=fold, rule=RULE)
    if isinstance(dense, nn.Conv1d):
        return SASConv1d.from_dense(dense, M, fold_relu=fold, rule=RULE)
    raise TypeError(f"no SAS layer for {type(dense).__name__}")


def _functional_target(op: str):
    return {"linear": torch.ops.sas.linear.default, "conv2d": sas_ops.sas_conv2d_call,
            "conv1d": sas_ops.sas_conv1d_call}[op]


def rewrite_layers_to_sas(gm: fx.GraphModule, plan: Plan) -> int:
    """Rewrite ``gm`` in place following ``plan``; returns how many call sites changed."""
    M = plan.M
    nodes: Dict[str, fx.Node] = {n.name: n for n in gm.graph.nodes}
    groups: Dict[str, List[LayerPlan]] = {}
    for layer in plan.eligible():
        groups.setdefault(layer.weight_target, []).append(layer)
    # match every site before any module is swapped (a swapped module no longer matches)
    calls = {layer.node: match_layer_call(nodes[layer.node], gm) for layer in plan.eligible()}
    changed = 0
    for target, group in groups.items():
        fold = group[0].fold_relu
        kind = group[0].extra.get("weight_kind")
        wide_node = None
        if kind == "attr":
            owner_path, _, pname = target.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            dense_weight = getattr(owner, pname)
            with torch.no_grad():
                wide = expand_dense_weight(dense_weight.detach(), M, fold_relu=fold, rule=RULE, groups=group[0].groups)
            owner.register_parameter(pname, nn.Parameter(wide, requires_grad=dense_weight.requires_grad))
        swapped = set()
        for layer in group:
            node = nodes[layer.node]
            call = calls[layer.node]
            if call.module is None:  # re-read: earlier rewrites may have replaced its inputs
                call = match_layer_call(node, gm)
            current_x = node.args[0] if node.args else node.kwargs["input"]
            x = relu_input(current_x, gm)[0] if layer.fold_relu else current_x
            if call.module is not None:
                if call.module_path not in swapped:
                    _set_submodule(gm, call.module_path, _sas_module(call.module, M, fold))
                    swapped.add(call.module_path)
                node.args = (x, *node.args[1:])
            else:
                weight = call.weight
                if kind == "placeholder":
                    if wide_node is None:
                        with gm.graph.inserting_after(weight):
                            wide_node = gm.graph.call_function(
                                expand_dense_weight, (weight, M), {"fold_relu": fold, "rule": RULE, "groups": layer.groups})
                    weight = wide_node
                if layer.op == "linear":
                    args = (x, weight, call.bias, M, RULE)
                else:
                    args = (x, weight, call.bias, call.stride, call.padding, call.dilation, call.groups, M, RULE)
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(_functional_target(layer.op), args)
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
    log.debug("rewrite_layers_to_sas: %d call sites converted (M=%d)", changed, M)
    return changed
