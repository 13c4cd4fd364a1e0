"""Lowering: on a GPU graph, a SAS layer whose fastest implementation is projection + dense
GEMM/conv becomes exactly that, written as aten ops.

Why: an opaque ``sas::`` op hides its projection from the inner compiler. Written out, the
compiler fuses the projection with the BatchNorm/ReLU before it into one pass that writes
the wide tensor and runs cuDNN/cuBLAS on it (on an H200, projection + cuDNN compiled by
inductor cost 1.52x the dense ResNet-18, where the opaque im2col + kernel path cost 11.6x).
A layer whose Sparse Tensor Core path measures faster (``runtime/autotune.py``, timed once
on random operands of the layer's shape and dtype) keeps its op. Graphs on the CPU are left
as they are: there the op already is the PyTorch formulation, with a backward that keeps
only the narrow activation.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import fx

from sas_compile.runtime import sas_ops, sas_transposed
from sas_compile.runtime.matmul import sas_linear_choice
from sas_compile.runtime.projection import expand_dense_weight

from .find_sas_layers import SAS_OPS, sas_op
from .plan import Plan

log = logging.getLogger("sas_compile.passes")

__all__ = ["lower_sas_to_projection", "graph_device"]

# kind of sas:: op (``find_sas_layers.SAS_OPS``, which finds the op whichever spelling the graph
# calls) -> the same call as plain aten ops; every replacement takes the op's arguments.
# A layer computed from a dense weight is the dense layer's function exactly (Wt S(x) = W x,
# W relu(z) when folded): its plain form is the dense op itself.
_LOWERINGS = {
    "linear": sas_ops.projected_linear,
    "conv2d": sas_ops.projected_conv2d,
    "linear_from_dense": sas_ops.dense_linear_through,
    "conv2d_from_dense": sas_ops.dense_conv2d_through,
    "conv_transpose": sas_transposed.projected_conv_transpose,
    "conv_transpose_from_dense": sas_transposed.dense_conv_transpose_through,
}
assert set(_LOWERINGS) == {spec.kind for spec in SAS_OPS.values()}, "every sas:: op needs its lowering"


def _example(arg) -> Optional[torch.Tensor]:
    """The fake/meta value of a graph input to the layer, when its shape is static."""
    if not isinstance(arg, fx.Node):
        return None
    value = arg.meta.get("example_value", arg.meta.get("val"))
    if isinstance(value, torch.Tensor):
        return value if all(isinstance(s, int) for s in value.shape) else None
    return None


def _random_like(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    out = torch.randn(tuple(value.shape), dtype=value.dtype, device=device)
    if value.dim() == 4 and not value.is_contiguous() and value.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _kernel_is_faster(node: fx.Node, kind: str, device: torch.device) -> bool:
    """Whether the autotuner picks a Sparse Tensor Core path for this layer's shape (no kernel
    computes a transposed convolution)."""
    if kind.startswith("conv_transpose"):
        return False
    x, weight = _example(node.args[0]), _example(node.args[1])
    bias = _example(node.args[2]) if node.args[2] is not None else None
    if x is None or weight is None or (node.args[2] is not None and bias is None):
        return False
    with torch.no_grad():
        xr, wr = _random_like(x, device), _random_like(weight, device)
        br = None if bias is None else _random_like(bias, device)
        if kind == "linear" or kind == "linear_from_dense":
            M, rule = node.args[3], node.args[-1] if kind == "linear" else node.args[5]
            if kind == "linear_from_dense":
                wr = expand_dense_weight(wr, M, rule=rule)
            decision, _ = sas_linear_choice(xr.reshape(-1, xr.shape[-1]), wr, br, M)
            return decision.impl != "dense"
        stride, padding, dilation, groups, M = node.args[3:8]
        rule = node.args[9] if kind == "conv2d_from_dense" else node.args[8]
        if kind == "conv2d_from_dense":
            wr = expand_dense_weight(wr, M, rule=rule, groups=groups)
        if not all(isinstance(v, (list, tuple)) for v in (stride, padding, dilation)):
            return False  # the op's own spelling (ints, 'same') is resolved at run time
        decision, _ = sas_ops.sas_conv2d_choice(xr, wr, br, list(stride), list(padding), list(dilation), groups,
                                                M, rule)
        return decision is not None and decision.impl != "dense"


def graph_device(example_inputs) -> Optional[torch.device]:
    """The device a captured graph runs on: its first tensor input's."""
    for value in example_inputs or ():
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def lower_sas_to_projection(gm: fx.GraphModule, plan: Plan, config) -> Plan:
    """Replace SAS op calls by projection + dense op on a GPU graph (``plan.lowered`` counts them).

    The device is ``config.device`` when set, else that of ``plan.example_inputs``;
    ``config.measure_kernels=False`` lowers every layer without consulting the autotuner.
    """
    device = getattr(config, "device", None) or graph_device(plan.example_inputs)
    if device is None or torch.device(device).type == "cpu":
        return plan
    device = torch.device(device)
    measure = getattr(config, "measure_kernels", True)
    lowered = kept = 0
    for node in list(gm.graph.nodes):
        spec = sas_op(node.target) if node.op == "call_function" else None
        if spec is None or node.kwargs:
            continue
        kind, replacement = spec.kind, _LOWERINGS[spec.kind]
        if measure and _kernel_is_faster(node, kind, device):
            kept += 1
            continue
        node.target = replacement
        lowered += 1
    if lowered:
        gm.graph.lint()
        gm.recompile()
        plan.graph_after = gm.code
    plan.lowered = lowered
    log.debug("lower_sas_to_projection: %d layers lowered to projection + dense, %d kept on the kernels",
              lowered, kept)
    return plan
