"""Analysis: fold a ReLU that feeds a SAS layer into the layer's projection.

Why: ``W relu(z) == Wt S(z)`` when the wide weight is zero on the slots that encode
``z <= 0`` (BRIEF section 1), so the SAS layer can read the pre-ReLU tensor ``z`` and the
negative slots start at zero and become trainable capacity. The reference code does this by
replacing every ReLU with Identity; here only the SAS layer reads ``z`` and every other
consumer of the ReLU keeps seeing its output.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from sas_compile.plan import Plan

from .find_sas_layers import match_layer_call

__all__ = ["relu_input", "fold_relu_into_projection"]

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, torch.ops.aten.relu.default, torch.ops.aten.relu_.default}
_INPLACE_FUNCTIONS = {torch.relu_, torch.ops.aten.relu_.default}


def relu_input(node, gm: fx.GraphModule):
    """``(z, inplace)`` when ``node`` is ``relu(z)`` in any spelling, else ``(None, False)``."""
    if not isinstance(node, fx.Node):
        return None, False
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.ReLU:
            return node.args[0], bool(mod.inplace)
    elif node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        inplace = node.target in _INPLACE_FUNCTIONS or bool(node.kwargs.get("inplace", False)) or (
            len(node.args) > 1 and bool(node.args[1]))
        return node.args[0], inplace
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        return node.args[0], node.target == "relu_"
    return None, False


def fold_relu_into_projection(plan: Plan, gm: fx.GraphModule) -> Plan:
    """Mark ``fold_relu`` on every eligible layer whose input is a foldable ReLU.

    All call sites of one weight share one wide weight, so they fold together or not at all.
    An in-place ReLU is folded only if nothing else reads its input (else ``z`` is mutated).
    """
    nodes: Dict[str, fx.Node] = {n.name: n for n in gm.graph.nodes}
    groups: Dict[str, List] = {}
    for layer in plan.layers:
        if not layer.eligible:
            continue
        call = match_layer_call(nodes[layer.node], gm)
        z, inplace = relu_input(call.x, gm)
        reason: Optional[str] = None
        if z is None:
            reason = "input is not a ReLU"
        elif not isinstance(z, fx.Node):
            reason = "ReLU input is not a tensor of the graph"
        elif inplace and len(z.users) > 1:
            reason = "in-place ReLU whose input is read elsewhere"
        layer.extra["fold_relu_reason"] = reason
        layer.relu_node = call.x.name if z is not None else None
        groups.setdefault(layer.weight_target, []).append(layer)
    for group in groups.values():
        fold = all(layer.extra["fold_relu_reason"] is None for layer in group)
        for layer in group:
            layer.fold_relu = fold
            if not fold and layer.extra["fold_relu_reason"] is None:
                layer.extra["fold_relu_reason"] = "weight shared with a call site whose input is not a ReLU"
    return plan
