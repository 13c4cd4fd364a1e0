"""Analysis: which SAS layers read a ReLU that can fold into their projection.

Why: ``W relu(z) == Wt S(z)`` when the wide weight is zero on the slots that encode
``z <= 0`` (BRIEF section 1), so the SAS layer can read the pre-ReLU tensor ``z`` and the
negative slots start at zero and become trainable capacity. The reference code does this by
replacing every ReLU with Identity; here only the SAS layer reads ``z`` and every other
consumer of the ReLU keeps seeing its output. This pass only decides (``fold_relu`` and the
reason on each layer); ``rewrite_layers_to_sas`` performs the fold.

One rule for every capture: a ReLU folds when the rewrite changes the graph (symbolic-trace
and dynamo captures). A torch.export capture is rewritten by swapping modules in the user's
model, whose own code applies the ReLU, so there nothing folds.

A fold that a module swap can express is marked too (``relu_module``): an ``nn.ReLU`` module
called at exactly one site whose only reader is the SAS layer can become ``nn.Identity`` in a
copy of the user's model, so the model keeps its class (``nn.Sequential`` CNNs). A ReLU
module called at two sites, or read by anything else, cannot: the graph itself must change.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .plan import Plan

__all__ = ["relu_input", "find_foldable_relus"]

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


def find_foldable_relus(gm: fx.GraphModule, plan: Plan, config) -> Plan:
    """Set ``fold_relu`` (and ``fold_relu_reason`` when not) on every eligible layer.

    All call sites of one weight share one wide weight, so they fold together or not at all.
    An in-place ReLU is folded only if nothing else reads its input (else ``z`` is mutated).
    ``config.fold_relu=False`` folds nothing.
    """
    groups: Dict[str, List] = {}
    calls_per_module = Counter(id(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module")
    for layer in plan.eligible():
        layer.fold_relu, layer.relu_node, layer.relu_module = False, None, None
        if not getattr(config, "fold_relu", True):
            layer.fold_relu_reason = "fold_relu=False"
            continue
        if plan.capture == "export" or (plan.capture == "dynamo" and plan.model is not None):
            layer.fold_relu_reason = f"module swap (a {plan.capture} capture) keeps the model's ReLUs"
            continue
        x = layer.call.node.args[0] if layer.call.node.args else layer.call.node.kwargs.get("input")
        z, inplace = relu_input(x, gm)
        reason: Optional[str] = None
        if z is None:
            reason = "input is not a ReLU"
        elif not isinstance(z, fx.Node):
            reason = "ReLU input is not a tensor of the graph"
        elif inplace and len(z.users) > 1:
            reason = "in-place ReLU whose input is read elsewhere"
        layer.fold_relu_reason = reason
        layer.relu_node = x.name if z is not None else None
        if (reason is None and x.op == "call_module" and list(x.users) == [layer.call.node]
                and calls_per_module[id(gm.get_submodule(x.target))] == 1):
            layer.relu_module = x.target  # a swap for nn.Identity folds it exactly
        groups.setdefault(layer.weight_group or layer.weight_target, []).append(layer)
    for group in groups.values():
        fold = all(layer.fold_relu_reason is None for layer in group)
        for layer in group:
            layer.fold_relu = fold
            if not fold and layer.fold_relu_reason is None:
                layer.fold_relu_reason = "weight shared with a call site whose input is not a ReLU"
    return plan
