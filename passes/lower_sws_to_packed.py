"""Lower a built SWS model's masked linears onto their packed 1:M weight and ``sws_matmul``.

Why this pass exists: ``swsify`` builds a trainable network whose 1:M weights are dense
tensors times a mask, so it multiplies every zero. The runtime's SWS GEMM
(``runtime.matmul.sws_matmul``: the Sparse Tensor Core kernel on ``cuda``, the same source on
the host ``emulator``, the PyTorch formulation on ``cpu``) reads the packed 2:4 format of
``runtime.packing.pack_sws_weight``. This pass is the bridge, as the SAS rewrite is for SAS
layers: every masked linear call (an ``nn.Linear`` module or a functional ``linear`` on a
parameter) becomes a :class:`PackedSWSLinear` whose packed weight is a pair of buffers, so it
moves with ``.to()`` and is saved in ``state_dict``.

What stays on the masked dense weight, with the reason in the returned summary:

* convolutions (conv1d, conv2d, conv3d): the packed kernel is a GEMM and feeding it a convolution
  needs im2col, which this pass does not do;
* a layer whose row length is not a multiple of M (``fan_in % M != 0``): its 1:M chunks
  straddle rows, so the weight has no 2:4 rows to pack;
* a layer without a mask (the dense input layer, excluded or unwidened layers): nothing to pack.

The masks are read once, at lowering: the packed weights are buffers and do not train, so
lower a model for inference (``eval()``; a mask taken from a model still training is the
mask of that moment).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from sas_compile.runtime.matmul import TARGETS, sws_matmul
from sas_compile.runtime.packing import PackedSparseWeight, pack_sws_weight, unpack_sws_weight
from sas_compile.runtime.sws_mask import drop_parametrization, sws_mask_of

from .find_sas_layers import LAYER_MODULES, LayerCall, match_layer_call, module_op

log = logging.getLogger("sas_compile.passes")

__all__ = ["PackedSWSLinear", "SWSLowering", "lower_sws_to_packed"]

# the default bias argument of PackedSWSLinear: "the module's own bias" (None means no bias, as in F.linear)
MODULE_BIAS = object()

CONV_STAYS = ("convolution: stays on the masked dense weight (the packed SWS kernel is a GEMM; "
              "lowering a convolution to it needs im2col, which lower_sws_to_packed does not do)")


class PackedSWSLinear(nn.Module):
    """``F.linear(x, W, bias)`` for a packed 1:M weight ``W``, by ``sws_matmul`` on ``target``.

    ``values`` and ``meta`` are the :class:`~sas_compile.runtime.packing.PackedSparseWeight`
    buffers; ``kept`` is the number of weights the 1:M mask kept (``ceil(N*K/M)``); ``source`` the
    weight it was packed from (its target in the SWS model). ``target``
    ("auto" | "cpu" | "cuda" | "emulator") may be changed at any time. A functional call site
    passes its graph's bias as the second argument, ``None`` included: a weight shared by a
    module call and ``F.linear(x, W)`` must not lend the module's bias to the functional call, so
    only the default (:data:`MODULE_BIAS`, a module call's) means ``self.bias``.
    """

    def __init__(self, packed: PackedSparseWeight, bias: Optional[Tensor], kept: int, target: str = "auto",
                 source: str = ""):
        super().__init__()
        self.register_buffer("values", packed.values)
        self.register_buffer("meta", packed.meta)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.out_features, self.in_features = packed.shape
        self.M = packed.M
        self.kept = int(kept)
        self.target = target
        self.source = source
        self._packed: Optional[PackedSparseWeight] = None

    def packed_weight(self) -> PackedSparseWeight:
        """The packed weight over this module's buffers (rebuilt when ``.to()`` replaced them)."""
        if self._packed is None or self._packed.values is not self.values or self._packed.meta is not self.meta:
            self._packed = PackedSparseWeight(self.values, self.meta, (self.out_features, self.in_features), self.M)
        return self._packed

    @property
    def weight(self) -> Tensor:
        """The dense (masked) weight the packed one stores, ``[out, in]`` (for counting and checks)."""
        return unpack_sws_weight(self.packed_weight())

    def forward(self, x: Tensor, bias: Any = MODULE_BIAS) -> Tensor:
        return sws_matmul(x, self.packed_weight(), self.bias if bias is MODULE_BIAS else bias, target=self.target)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, M={self.M}, "
                f"kept={self.kept}, bias={self.bias is not None}, target={self.target!r}")

    def __prepare_scriptable__(self):
        """One error for ``torch.jit.script``, which cannot compile the packed weight's class."""
        raise TypeError(f"torch.jit.script cannot compile a packed SWS layer ({self.source or 'PackedSWSLinear'}: "
                        "its weight is a Python PackedSparseWeight): torch.jit.trace the lowered model instead "
                        "(in eval mode, under torch.no_grad()) or torch.export it")


@dataclass
class SWSLowering:
    """What :func:`lower_sws_to_packed` did, per layer node name of the SWS model."""

    target: str
    lowered: Dict[str, str] = field(default_factory=dict)  # node -> path of its PackedSWSLinear
    kept: Dict[str, str] = field(default_factory=dict)  # node -> why it stays on its (masked) weight

    def __str__(self) -> str:
        lines = [f"SWS lowering (target={self.target!r}): {len(self.lowered)} linears on the packed weight, "
                 f"{len(self.kept)} layers stay"]
        lines += [f"  {node}: packed -> {path}" for node, path in self.lowered.items()]
        lines += [f"  {node}: stays: {why}" for node, why in self.kept.items()]
        return "\n".join(lines)


def _owner(gm: nn.Module, target: str) -> Tuple[nn.Module, str]:
    parent, _, attr = target.rpartition(".")
    return (gm.get_submodule(parent) if parent else gm), attr


def _packable(call, weight_target: str, gm: fx.GraphModule, M: int) -> Optional[str]:
    """Why this layer cannot be lowered, or None."""
    if call is not None and call.op.startswith("conv"):  # transposed ones too
        return CONV_STAYS
    if call is None or call.op != "linear":
        return "not a linear call of the graph"
    owner, attr = _owner(gm, weight_target)
    if sws_mask_of(owner, attr) is None:
        return "dense weight (no 1:M mask): nothing to pack"
    k = getattr(owner, attr).shape[1]
    if k % M:
        return (f"{k} weights per row, not a multiple of M={M}: its 1:{M} chunks straddle rows, so the "
                "weight has no 2:4 rows to pack; it stays on the masked dense weight")
    return None


def _packed_module(gm: fx.GraphModule, weight_target: str, bias: Optional[Tensor], M: int, target: str
                   ) -> PackedSWSLinear:
    owner, attr = _owner(gm, weight_target)
    mask = sws_mask_of(owner, attr)
    with torch.no_grad():
        weight = getattr(owner, attr).detach().clone().contiguous()
        kept = int(mask.mask(getattr(owner.parametrizations, attr).original).sum())
    return PackedSWSLinear(pack_sws_weight(weight, M), bias, kept, target, weight_target)


def lower_sws_to_packed(gm: nn.Module, *, target: str = "auto") -> SWSLowering:
    """Rewrite (in place) every masked linear of an ``swsify``-built ``gm`` into a :class:`PackedSWSLinear`.

    A module call swaps the ``nn.Linear`` for the packed module at the same path; a functional
    call on a masked parameter becomes a call of a packed module registered beside it
    (``<weight>_packed``), the dense parameter removed once nothing else reads it. Returns what
    was lowered and what stays, with the reason (also ``gm.sws_lowering``); ``gm.sws_layers``
    then names the packed modules' weights.
    """
    if getattr(gm, "sws_layers", None) is None:
        raise ValueError("lower_sws_to_packed: expected a model built by sas_compile.swsify")
    if target not in TARGETS:
        raise ValueError(f"lower_sws_to_packed: target={target!r} is not one of {list(TARGETS)}")
    M = gm.sws_M
    summary = SWSLowering(target)
    calls = _layer_calls(gm)
    # decide every layer before rewriting any: a shared module is swapped once for all its calls
    todo = []
    for node_name, weight_target in gm.sws_layers.items():
        call = calls[node_name]
        why = _packable(call, weight_target, gm, M)
        if why is None:
            todo.append((node_name, weight_target, call))
        else:
            summary.kept[node_name] = why
    packed_by_weight: Dict[str, str] = {}  # weight target -> path of its packed module
    # module calls first: the swapped module then serves the functional calls of its weight too; a
    # functional call first would pack beside the module and leave its call on the dropped weight
    for node_name, weight_target, call in sorted(todo, key=lambda item: item[2].module is None):
        path = packed_by_weight.get(weight_target)
        if path is None:
            if call.module is not None:
                path, bias = call.module_path, call.module.bias
            else:
                parent, _, attr = weight_target.rpartition(".")
                path, bias = (f"{parent}.{attr}_packed" if parent else f"{attr}_packed"), None
            packed = _packed_module(gm, weight_target, bias, M, target)
            gm.set_submodule(path, packed)
            packed_by_weight[weight_target] = path
        if call.module is None:
            _call_packed(gm, call, path)
        summary.lowered[node_name] = path
        gm.sws_layers[node_name] = f"{path}.weight"
    summary.lowered = {node_name: summary.lowered[node_name] for node_name, _, _ in todo}  # graph order
    if any(call.module is None for _, _, call in todo):  # functional calls: only in a GraphModule
        _drop_unread_weights(gm, packed_by_weight)
        gm.graph.lint()
        _recompile(gm)
    gm.sws_lowering = summary
    log.debug("lower_sws_to_packed: %d linears packed, %d layers stay", len(summary.lowered), len(summary.kept))
    return summary


def _layer_calls(gm: nn.Module) -> Dict[str, Optional[LayerCall]]:
    """The call of every SWS layer (node name -> LayerCall, None where it is no conv/linear call).

    An SWS model of the user's class (``sws_module_swaps``) has no graph: every layer is the
    module holding its weight, and lowering it only swaps modules."""
    if getattr(gm, "sws_module_swaps", False):
        out: Dict[str, Optional[LayerCall]] = {}
        for node_name, weight_target in gm.sws_layers.items():
            path = weight_target.rpartition(".")[0]
            module = gm.get_submodule(path)
            out[node_name] = (LayerCall(None, module_op(module), None, None, None, module, path)
                              if isinstance(module, LAYER_MODULES) else None)
        return out
    nodes = {n.name: n for n in gm.graph.nodes}
    return {node_name: match_layer_call(nodes[node_name], gm) if node_name in nodes else None
            for node_name in gm.sws_layers}


def _call_packed(gm: fx.GraphModule, call, path: str) -> None:
    """Make a functional linear node a call of the packed module, in place (its name, which keys the
    SWS layer, stays); the graph's bias is passed along, ``None`` too (the packed module may be a
    swapped ``nn.Linear`` whose own bias this call does not add)."""
    node = call.node
    node.op, node.target = "call_module", path
    node.args, node.kwargs = (call.x, call.bias), {}
    if isinstance(call.weight, fx.Node) and not call.weight.users:
        gm.graph.erase_node(call.weight)


def _drop_unread_weights(gm: fx.GraphModule, packed_by_weight: Dict[str, str]) -> None:
    """A functional layer's dense parameter goes once no graph node reads it (the packed copy replaces it).

    A call of a module that owns the parameter (one not lowered) reads it too, without a get_attr node.
    """
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = [f"{n.target}." for n in gm.graph.nodes if n.op == "call_module"]
    for weight_target, path in packed_by_weight.items():
        if weight_target in read or weight_target == f"{path}.weight":  # still read, or a swapped module's
            continue
        if any(weight_target.startswith(prefix) for prefix in called):  # its module's call reads it
            continue
        owner, attr = _owner(gm, weight_target)
        if parametrize.is_parametrized(owner, attr):
            drop_parametrization(owner, attr)
        delattr(owner, attr)


def _recompile(gm: fx.GraphModule) -> None:
    """``gm.recompile()`` on the class fx made for ``gm``, also when its own weights are parametrized.

    parametrize swaps a parametrized module's class for a subclass; recompiling on that subclass
    makes fx's ``__call__`` wrapper call itself, so the base class is recompiled instead.
    """
    cls = type(gm)
    if not parametrize.is_parametrized(gm):
        gm.recompile()
        return
    gm.__class__ = cls.__bases__[0]
    try:
        gm.recompile()
    finally:
        gm.__class__ = cls
