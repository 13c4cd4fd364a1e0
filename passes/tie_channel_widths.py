"""Channel-dependency analysis for SWS: which tensor widths of an FX graph must widen together.

Why this pass exists: SWS widens every hidden width by sqrt(M), but a width is shared by
everything that touches it: a residual add ties the widths of both branches, a norm ties
its parameters, a reshape into heads ties the head size to the projection's width, a
concatenation's width is the sum of its inputs'. Widening one layer at a time gives a
model that does not run; this pass decides, once for the whole graph, which widths are
tied (a union-find over *width groups*) and which of them can widen safely.

Model of a tensor
-----------------
Every dimension of every tensor value is a :class:`Dim`: a sum of segments
``(group, factor)``, its size ``sum(size(group) * factor)``. An ordinary dimension is one
segment with factor 1; a concatenation keeps one segment per input (widths add up); a
flatten of ``[C, H, W]`` into a linear is ``(C, H*W)`` (the linear's input width is
channels x spatial positions); the head size of a reshape into heads is ``(C, 1/heads)``
(heads stay fixed, the head size follows the width). Groups born from network inputs,
spatial sizes and constants are *fixed*; ties to a fixed group fix the whole group.

Decision
--------
A group widens to ``sws_width(C, M) = round_half_up(sqrt(M) * C)`` when it is not fixed and
holds the input or output width of a conv/linear. Every segment must then stay an integer
(``W * factor``; e.g. the widened width must split into the same number of heads); a group
that fails stays at its size, with the reason. Without example inputs the analysis guesses
one input from the first layer that reads it and says so in the reasons when it cannot.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from .costs import sws_width

log = logging.getLogger("sas_compile.passes")

__all__ = [
    "SWSLayerWidths",
    "ChannelWidths",
    "Dim",
    "tie_channel_widths",
    "sws_layer_widths",
]


# --------------------------------------------------------------------------- result types


@dataclass
class SWSLayerWidths:
    """Widths of one conv/linear call site after SWS widening.

    ``in_channels``/``out_channels`` are the widened narrow widths (a conv's Cin/Cout, a
    linear's in/out features); ``in_features`` is the per-output fan-in after widening
    (``in_channels/groups * kernel``), ``out_features == out_channels``. ``widened`` is True
    when either width changed. ``sparse`` is True when the weight is 1:M sparse, so its
    nonzeros (and mults per output position) are ``ceil(in_features * out_features / M)``;
    a widened layer is sparse unless it reads the raw network input and
    ``dense_input_layers=True`` (sasify's policy: it keeps every one of its weights). A layer
    whose widths both stay is dense. ``reason`` says why a width stays or the weight stays
    dense (None when both widths widen and the weight is sparse).
    """

    in_channels: int
    out_channels: int
    in_features: int
    out_features: int
    groups: int
    widened: bool
    reason: Optional[str]
    base_in_channels: int = 0
    base_out_channels: int = 0
    kernel_size: Tuple[int, ...] = ()
    op: str = "linear"  # "linear" | "conv1d" | "conv2d"
    M: int = 2
    sparse: Optional[bool] = None  # None: the same as ``widened``
    reads_network_input: bool = False

    def __post_init__(self):
        if self.sparse is None:
            self.sparse = self.widened

    @property
    def weight_numel(self) -> int:
        """Stored (dense) weight entries of the widened layer."""
        return self.out_features * self.in_features

    @property
    def nonzeros(self) -> int:
        """Kept weights: ``ceil(in*out/M)`` for a 1:M sparse layer, else all."""
        if not self.sparse:
            return self.weight_numel
        return -(-self.weight_numel // self.M)


@dataclass(frozen=True)
class Dim:
    """One tensor dimension: a sum of ``(group id, factor)`` segments."""

    segs: Tuple[Tuple[int, Fraction], ...]

    def scaled(self, k) -> "Dim":
        k = Fraction(k)
        return Dim(tuple((g, f * k) for g, f in self.segs))


@dataclass
class _Group:
    size: int
    fixed: bool = False
    reason: Optional[str] = None
    width: bool = False  # holds a conv/linear input or output width
    members: int = 1


@dataclass
class ChannelWidths:
    """What the analysis decided: every node's dims, every group's width, every layer's widths."""

    M: int
    widths: Dict[int, int]  # group root -> widened width (== size when it stays)
    reasons: Dict[int, Optional[str]]  # group root -> why it stays (None when it widens)
    node_dims: Dict[str, Any]  # node name -> list[Dim] | tuple of those | Dim (int values) | None
    layers: Dict[str, SWSLayerWidths]
    layer_params: Dict[str, Tuple[Optional[str], Optional[str]]]  # node -> (weight, bias) targets
    param_dims: Dict[str, List[Dim]]  # parameter/buffer target -> dims
    notes: List[str] = field(default_factory=list)
    _uf: Any = None

    def size_of(self, dim: Dim) -> int:
        """Widened size of ``dim``."""
        total = Fraction(0)
        for g, f in self._uf.resolve(dim).segs:
            total += self.widths[self._uf.find(g)] * f
        if total.denominator != 1:  # pragma: no cover - excluded by the integrality fixpoint
            raise AssertionError(f"non-integral width {total}")
        return int(total)

    def base_size_of(self, dim: Dim) -> int:
        """Size of ``dim`` before widening."""
        return int(self._uf.dim_size(dim))

    def shape_of(self, node_name: str) -> Optional[Tuple[int, ...]]:
        """Widened shape of a tensor node (None for non-tensor nodes)."""
        dims = self.node_dims.get(node_name)
        if not isinstance(dims, list):
            return None
        return tuple(self.size_of(d) for d in dims)

    def param_shape(self, target: str) -> Optional[Tuple[int, ...]]:
        """Widened shape of the parameter/buffer at ``target`` (None if never seen)."""
        dims = self.param_dims.get(target)
        if dims is None:
            return None
        return tuple(self.size_of(d) for d in dims)


# --------------------------------------------------------------------------- union-find


class _UnionFind:
    def __init__(self):
        self.parent: List[int] = []
        self.groups: List[_Group] = []
        self.alias: Dict[int, Dim] = {}  # root -> the Dim its size is a multiple of
        self.requirements: List[Tuple[Dim, str]] = []  # dims that must stay integral

    def new(self, size, *, fixed=False, reason=None) -> Dim:
        gid = len(self.parent)
        self.parent.append(gid)
        self.groups.append(_Group(int(size), fixed, reason if fixed else None))
        return Dim(((gid, Fraction(1)),))

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def group(self, g: int) -> _Group:
        return self.groups[self.find(g)]

    def resolve(self, dim: Dim) -> Dim:
        out: List[Tuple[int, Fraction]] = []
        for g, f in dim.segs:
            r = self.find(g)
            if r in self.alias:
                out.extend(self.resolve(self.alias[r].scaled(f)).segs)
            else:
                out.append((r, f))
        return Dim(tuple(out))

    def dim_size(self, dim: Dim) -> Fraction:
        return sum((self.groups[g].size * f for g, f in self.resolve(dim).segs), Fraction(0))

    def is_fixed(self, dim: Dim) -> bool:
        return all(self.groups[g].fixed for g, _ in self.resolve(dim).segs)

    def fix(self, dim: Dim, reason: str) -> None:
        for g, _ in self.resolve(dim).segs:
            grp = self.groups[g]
            if not grp.fixed:
                grp.fixed, grp.reason = True, reason

    def mark_width(self, dim: Dim) -> None:
        for g, _ in self.resolve(dim).segs:
            self.groups[g].width = True

    def _union(self, a: int, b: int, where: str) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        ga, gb = self.groups[a], self.groups[b]
        if ga.size != gb.size:
            reason = f"{where}: sizes {ga.size} and {gb.size} meet"
            ga.fixed = gb.fixed = True
            ga.reason = ga.reason or reason
            gb.reason = gb.reason or reason
            return
        if gb.members > ga.members:
            a, b, ga, gb = b, a, gb, ga
        self.parent[b] = a
        ga.members += gb.members
        ga.width = ga.width or gb.width
        if gb.fixed and not ga.fixed:
            ga.fixed, ga.reason = True, gb.reason
        elif ga.fixed and gb.fixed and ga.reason is None:
            ga.reason = gb.reason

    def _alias(self, seg: Tuple[int, Fraction], other: Dim) -> bool:
        """Make ``seg``'s group a multiple of ``other`` (seg == other), if that is safe."""
        g, f = seg
        grp = self.groups[g]
        if grp.fixed or any(self.find(h) == g for h, _ in other.segs):
            return False
        target = other.scaled(1 / f)
        if self.dim_size(target) != grp.size:
            return False
        self.alias[g] = target
        if grp.width:
            self.mark_width(target)
        return True

    def tie(self, a: Dim, b: Dim, where: str) -> None:
        """Declare that dims ``a`` and ``b`` are the same width."""
        a, b = self.resolve(a), self.resolve(b)
        if a == b:
            return
        if len(a.segs) == len(b.segs) and all(fa == fb for (_, fa), (_, fb) in zip(a.segs, b.segs)):
            for (ga, _), (gb, _) in zip(a.segs, b.segs):
                self._union(ga, gb, where)
            return
        # different structure: one side's group becomes a multiple of the other side
        candidates = []
        if len(a.segs) == 1:
            candidates.append((self.groups[a.segs[0][0]].members, a.segs[0], b))
        if len(b.segs) == 1:
            candidates.append((self.groups[b.segs[0][0]].members, b.segs[0], a))
        for _, seg, other in sorted(candidates, key=lambda c: c[0]):
            if self._alias(seg, other):
                return
        self.fix(a, f"{where}: widths of different structure meet")
        self.fix(b, f"{where}: widths of different structure meet")


# --------------------------------------------------------------------------- op tables

_UNARY = {
    "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid",
    "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "hardtanh", "dropout", "dropout1d",
    "dropout2d", "alpha_dropout", "feature_dropout", "native_dropout", "neg", "abs", "exp", "log",
    "sqrt", "rsqrt", "erf", "square", "reciprocal", "clone", "detach", "contiguous", "float",
    "half", "bfloat16", "double", "to", "type", "type_as", "_to_copy", "alias", "softmax",
    "log_softmax", "_softmax", "_log_softmax", "clamp", "clamp_min", "clamp_max", "identity",
    "lift_fresh_copy", "sign", "floor", "ceil", "round", "cos", "sin", "pow", "cpu", "cuda",
    "requires_grad_", "_assert_tensor_metadata", "masked_fill", "logical_not", "bitwise_not",
    "sigmoid_", "tanh_", "gelu_", "silu_", "hardswish_", "dropout_", "_native_batch_norm_legit_no_training",
}
_BINARY = {
    "add", "sub", "mul", "div", "true_divide", "floordiv", "rsub", "maximum", "minimum", "where",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "bitwise_and", "bitwise_or",
    "and_", "or_", "truediv", "iadd", "isub", "imul", "itruediv", "fmod", "remainder", "addcmul",
    "lerp", "masked_fill_", "mul_", "add_", "sub_", "div_", "clamp_",
}
_POOL = {
    "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "max_pool1d",
    "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d", "max_pool1d_with_indices", "lp_pool1d",
    "max_pool2d_with_indices", "lp_pool2d", "upsample_nearest1d", "upsample_linear1d",
    "_adaptive_avg_pool2d", "upsample_nearest2d", "upsample_bilinear2d", "interpolate", "pad",
    "constant_pad_nd", "pixel_shuffle",
}
_VIEW = {"view", "reshape", "_unsafe_view", "view_as", "reshape_as", "flatten", "unflatten",
         "squeeze", "unsqueeze", "squeeze_", "unsqueeze_"}
_PERMUTE = {"permute", "transpose", "t", "swapaxes", "movedim", "transpose_"}
_CREATE = {"zeros", "ones", "full", "empty", "arange", "rand", "randn", "zeros_like", "ones_like",
           "full_like", "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "tensor",
           "scalar_tensor", "randn_like", "rand_like", "linspace", "eye", "tril", "triu"}
_NOOP = {"_guards_fn", "_assert_async", "_assert_scalar", "sym_constrain_range_for_size",
         "_set_grad_enabled", "_enter_autocast", "_exit_autocast"}
_MODULE_OPS: Dict[type, str] = {
    nn.Conv2d: "conv2d", nn.Conv1d: "conv1d", nn.Linear: "linear", nn.BatchNorm1d: "batch_norm",
    nn.BatchNorm2d: "batch_norm", nn.LayerNorm: "layer_norm", nn.GroupNorm: "group_norm",
    nn.Embedding: "embedding", nn.Flatten: "flatten", nn.Identity: "identity",
    nn.MaxPool2d: "max_pool2d", nn.AvgPool2d: "avg_pool2d", nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d",
    nn.AdaptiveMaxPool2d: "adaptive_max_pool2d", nn.Dropout: "dropout", nn.Dropout2d: "dropout",
    nn.MaxPool1d: "max_pool1d", nn.AvgPool1d: "avg_pool1d", nn.AdaptiveAvgPool1d: "adaptive_avg_pool1d",
    nn.AdaptiveMaxPool1d: "adaptive_max_pool1d", nn.Dropout1d: "dropout",
    nn.ReLU: "relu", nn.ReLU6: "relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
    nn.LeakyReLU: "leaky_relu", nn.ELU: "elu", nn.Mish: "mish", nn.Softmax: "softmax",
    nn.Hardtanh: "hardtanh", nn.Softplus: "softplus",
}


def _op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        for cls in type(mod).__mro__:
            if cls in _MODULE_OPS:
                return _MODULE_OPS[cls]
        return f"module:{type(mod).__name__}"
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    if target is getattr:
        return "getattr"
    if target is operator.getitem:
        return "getitem"
    if target is operator.matmul:
        return "matmul"
    name = getattr(target, "__name__", str(target))
    return name


def _tensor_meta(node: fx.Node):
    """(shape tuple, is-tensor) from node.meta, or None when unknown."""
    val = node.meta.get("val", node.meta.get("example_value"))
    if val is not None:
        return _shape_tree(val)
    tm = node.meta.get("tensor_meta")
    if tm is not None:
        return _shape_tree(tm)
    return None


def _shape_tree(val):
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    if hasattr(val, "shape") and hasattr(val, "dtype"):  # FakeTensor, ShapeProp's TensorMetadata
        return tuple(int(s) for s in val.shape)
    if isinstance(val, (list, tuple)) and not isinstance(val, torch.Size):
        return tuple(_shape_tree(v) for v in val)
    return None


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(s, int) for s in x)


# --------------------------------------------------------------------------- the analysis


class _Analysis:
    def __init__(self, gm: fx.GraphModule, M: int, filter_fn=None):
        self.gm = gm
        self.M = M
        self.filter_fn = filter_fn
        self.uf = _UnionFind()
        self.env: Dict[str, Any] = {}
        self.params: Dict[str, List[Dim]] = {}
        self.layers: Dict[str, dict] = {}
        self.layer_params: Dict[str, Tuple[Optional[str], Optional[str]]] = {}
        self.notes: List[str] = []
        self.param_targets: Dict[str, str] = {}  # node name -> target of a parameter value

    # ---- helpers
    def fresh(self, size, reason="not a channel width") -> Dim:
        return self.uf.new(size, fixed=True, reason=reason)

    def free(self, size) -> Dim:
        return self.uf.new(size)

    def param(self, target: str, shape: Sequence[int]) -> List[Dim]:
        dims = self.params.get(target)
        if dims is None:
            dims = [self.free(s) for s in shape]
            self.params[target] = dims
        return dims

    def dims(self, arg) -> Optional[List[Dim]]:
        if isinstance(arg, fx.Node):
            v = self.env.get(arg.name)
            return v if isinstance(v, list) else None
        return None

    def size(self, d: Dim) -> int:
        return int(self.uf.dim_size(d))

    def fix_all(self, value, reason):
        if isinstance(value, Dim):
            self.uf.fix(value, reason)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.fix_all(v, reason)

    def shape(self, node) -> Any:
        return _tensor_meta(node) if isinstance(node, fx.Node) else None

    def fresh_dims(self, shape, reason) -> Any:
        if _is_shape(shape):
            return [self.fresh(s, reason) for s in shape]
        if isinstance(shape, tuple):
            return tuple(self.fresh_dims(s, reason) for s in shape)
        return None

    def tie_broadcast(self, ins: List[List[Dim]], out_shape, where) -> List[Dim]:
        """Elementwise ops: dims aligned from the right tie unless one side broadcasts (size 1)."""
        rank = len(out_shape)
        out: List[Optional[Dim]] = [None] * rank
        for dims in ins:
            for i, d in enumerate(dims):
                j = rank - len(dims) + i
                if j < 0 or self.size(d) == 1 and out_shape[j] != 1:
                    continue
                if out[j] is None:
                    out[j] = d
                else:
                    self.uf.tie(out[j], d, where)
        return [d if d is not None else self.fresh(out_shape[j], f"broadcast in {where}")
                for j, d in enumerate(out)]

    # ---- run
    def run(self):
        for node in self.gm.graph.nodes:
            try:
                self.env[node.name] = self.visit(node)
            except _Unsupported as err:
                self.unsupported(node, str(err))
        return self

    def unsupported(self, node: fx.Node, why: str):
        reason = f"{why} (node {node.name})"
        for a in node.all_input_nodes:
            self.fix_all(self.env.get(a.name), reason)
        out = self.fresh_dims(self.shape(node), reason)
        self.env[node.name] = out

    def visit(self, node: fx.Node):
        if node.op == "placeholder":
            shape = self.shape(node)
            val = node.meta.get("val", node.meta.get("example_value"))
            if isinstance(val, nn.Parameter) or "_parameters_" in node.name or "_buffers_" in node.name:
                if _is_shape(shape):
                    return list(self.param(node.name, shape))
            if shape is None:
                return None
            return self.fresh_dims(shape, f"network input '{node.name}'")
        if node.op == "get_attr":
            val = _get_attr(self.gm, node.target)
            if isinstance(val, torch.Tensor):
                return list(self.param(node.target, tuple(val.shape)))
            return None
        if node.op == "output":
            self.fix_all([self.env.get(a.name) for a in node.all_input_nodes], "network output")
            return None
        if node.op == "call_module" and node.target in _NOOP:  # export's guard check
            return None
        name = _op_name(node, self.gm)
        if name in _NOOP:
            return None
        handler = getattr(self, f"op_{name}", None)
        if handler is None:
            handler = self._generic(name)
        return handler(node)

    def _generic(self, name) -> Callable:
        if name in _UNARY or name in _BINARY:
            return self.elementwise
        if name in _POOL:
            return self.pool
        if name in _VIEW:
            return self.reshape
        if name in _PERMUTE:
            return self.permute
        if name in _CREATE:
            return self.create
        return self.unknown(name)

    def unknown(self, name):
        def handler(node):
            tensor_in = any(isinstance(self.env.get(a.name), (list, tuple)) for a in node.all_input_nodes)
            out = self.shape(node)
            if not tensor_in and out is None:
                return None  # python arithmetic on sizes we do not track
            raise _Unsupported(f"unsupported op {name}")
        return handler

    # ---- non-tensor values (sizes)
    def op_size(self, node):
        dims = self.dims(node.args[0])
        if dims is None:
            return None
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if d is None:
            return tuple(dims)
        return dims[d]

    op_sym_size = op_size

    def op_getattr(self, node):
        dims = self.dims(node.args[0])
        if node.args[1] == "shape" and dims is not None:
            return tuple(dims)
        if dims is not None and node.args[1] in ("T", "mT"):
            return self.permute(node)
        return None

    def op_dim(self, node):
        return None

    op_numel = op_dim

    def op_getitem(self, node):
        src, idx = node.args[0], node.args[1]
        value = self.env.get(src.name) if isinstance(src, fx.Node) else None
        if isinstance(value, tuple):
            if isinstance(idx, int):
                return value[idx]
            if isinstance(idx, slice):
                return value[idx]
            return None
        if isinstance(value, list):
            return self.index_tensor(node, value, idx)
        return None

    def index_tensor(self, node, dims: List[Dim], idx):
        if not isinstance(idx, tuple):
            idx = (idx,)
        out_shape = self.shape(node)
        if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in idx) or not _is_shape(out_shape):
            raise _Unsupported("tensor indexing")
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        out: List[Dim] = []
        pos = 0
        for i in idx:
            if i is Ellipsis:
                span = len(dims) - n_real
                out.extend(dims[pos:pos + span])
                pos += span
            elif i is None:
                out.append(self.fresh(1))
            elif isinstance(i, int):
                if not self.uf.is_fixed(dims[pos]):
                    self.uf.fix(dims[pos], f"indexing a single channel (node {node.name})")
                pos += 1
            elif isinstance(i, slice):
                if i == slice(None):
                    out.append(dims[pos])
                else:
                    self.uf.fix(dims[pos], f"slicing a width (node {node.name})")
                    out.append(self.fresh(out_shape[len(out)]))
                pos += 1
            else:
                raise _Unsupported("tensor indexing")
        out.extend(dims[pos:])
        return out

    def op_select(self, node):
        dims = self.dims(node.args[0])
        if dims is None:
            raise _Unsupported("select of an unknown tensor")
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs["dim"]) % len(dims)
        if not self.uf.is_fixed(dims[dim]):
            self.uf.fix(dims[dim], f"indexing a single channel (node {node.name})")
        return dims[:dim] + dims[dim + 1:]

    def op_slice(self, node):
        dims = self.dims(node.args[0])
        shape = self.shape(node)
        if dims is None or not _is_shape(shape):
            raise _Unsupported("slice of an unknown tensor")
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(dims)
        out = list(dims)
        if shape[dim] != self.size(dims[dim]):
            self.uf.fix(dims[dim], f"slicing a width (node {node.name})")
            out[dim] = self.fresh(shape[dim])
        return out

    def op_floordiv(self, node):
        a, b = node.args[0], node.args[1]
        da = self.env.get(a.name) if isinstance(a, fx.Node) else None
        if isinstance(da, Dim) and isinstance(b, int):
            scaled = da.scaled(Fraction(1, b))
            self.uf.requirements.append((scaled, f"{node.name}: width split by {b}"))
            return scaled
        if isinstance(da, list) or isinstance(self.env.get(getattr(b, "name", None)), list):
            return self.elementwise(node)
        return None

    def op_mul(self, node):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        da = self.env.get(a.name) if isinstance(a, fx.Node) else None
        db = self.env.get(b.name) if isinstance(b, fx.Node) else None
        if isinstance(da, Dim) and isinstance(b, int):
            return da.scaled(b)
        if isinstance(db, Dim) and isinstance(a, int):
            return db.scaled(a)
        if isinstance(da, list) or isinstance(db, list):
            return self.elementwise(node)
        return None

    # ---- elementwise, shape ops
    def elementwise(self, node):
        out_shape = self.shape(node)
        ins = [self.dims(a) for a in _flat_args(node)]
        ins = [d for d in ins if d is not None]
        if not ins:
            if out_shape is not None and _is_shape(out_shape):
                return [self.fresh(s, f"computed from constants (node {node.name})") for s in out_shape]
            return None
        if not _is_shape(out_shape):
            if len(ins) == 1 and out_shape is None:
                return list(ins[0])
            raise _Unsupported("elementwise op with unknown output shape")
        return self.tie_broadcast(ins, out_shape, node.name)

    op_identity = elementwise

    def create(self, node):
        return self.fresh_dims(self.shape(node), f"size set by a constant (node {node.name})")

    def op_expand(self, node):
        dims = self.dims(node.args[0])
        out_shape = self.shape(node)
        if dims is None or not _is_shape(out_shape):
            raise _Unsupported("expand with unknown shapes")
        out = [self.fresh(s, f"expanded (node {node.name})") for s in out_shape]
        for i, d in enumerate(dims):
            j = len(out_shape) - len(dims) + i
            if self.size(d) == out_shape[j]:
                out[j] = d
        self.tie_size_args(node, out, _size_args(node))
        return out

    op_expand_as = op_expand
    op_repeat = op_expand

    def permute(self, node):
        dims = self.dims(node.args[0])
        if dims is None:
            raise _Unsupported("permute of an unknown tensor")
        name = _op_name(node, self.gm)
        rank = len(dims)
        if name in ("t", "T") or (name == "getattr"):
            order = list(range(rank))[::-1]
        elif name == "permute":
            order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
            order = [o % rank for o in order]
        elif name == "movedim":
            src, dst = node.args[1] % rank, node.args[2] % rank
            order = [i for i in range(rank) if i != src]
            order.insert(dst, src)
        else:  # transpose / swapaxes
            a = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim0")) % rank
            b = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim1")) % rank
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
        return [dims[o] for o in order]

    def reshape(self, node):
        dims = self.dims(node.args[0])
        in_shape = self.shape(node.args[0])
        out_shape = self.shape(node)
        if dims is None or not _is_shape(in_shape) or not _is_shape(out_shape):
            raise _Unsupported("reshape with unknown shapes")
        out = self.regroup(node, dims, in_shape, out_shape)
        if _op_name(node, self.gm) in ("view", "reshape", "_unsafe_view"):
            self.tie_size_args(node, out, _size_args(node))
        return out

    def tie_size_args(self, node, out: List[Dim], args):
        """Sizes given as graph values (``x.size(1) // heads``) tie the dims they produce."""
        if args is None or len(args) != len(out):
            return
        for d, a in zip(out, args):
            if isinstance(a, fx.Node):
                v = self.env.get(a.name)
                if isinstance(v, Dim):
                    self.uf.tie(d, v, node.name)
                elif not self.uf.is_fixed(d):
                    self.uf.fix(d, f"size computed by an untracked expression (node {node.name})")

    def regroup(self, node, dims, in_shape, out_shape) -> List[Dim]:
        """Reshape: match runs of input dims to runs of output dims with equal products."""
        where = node.name
        out: List[Optional[Dim]] = [None] * len(out_shape)
        ins = [(i, s) for i, s in enumerate(in_shape) if s != 1]
        outs = [(j, s) for j, s in enumerate(out_shape) if s != 1]
        for j, s in enumerate(out_shape):
            if s == 1:
                out[j] = self.fresh(1)
        a = b = 0
        while a < len(ins) or b < len(outs):
            ia, ib = [ins[a]] if a < len(ins) else [], [outs[b]] if b < len(outs) else []
            if not ia or not ib:
                raise _Unsupported("reshape with mismatched sizes")
            pa, pb = ia[0][1], ib[0][1]
            a, b = a + 1, b + 1
            while pa != pb:
                if pa < pb:
                    if a >= len(ins):
                        raise _Unsupported("reshape with mismatched sizes")
                    ia.append(ins[a]); pa *= ins[a][1]; a += 1
                else:
                    if b >= len(outs):
                        raise _Unsupported("reshape with mismatched sizes")
                    ib.append(outs[b]); pb *= outs[b][1]; b += 1
            block_in = [dims[i] for i, _ in ia]
            if len(ia) == 1 and len(ib) == 1:
                out[ib[0][0]] = block_in[0]
            elif len(ia) == 1:  # split: the last (innermost) output dim carries the width
                d = self.uf.resolve(block_in[0])
                if self.uf.is_fixed(d):
                    for j, s in ib:
                        out[j] = self.fresh(s)
                elif len(d.segs) == 1:
                    lead = 1
                    for j, s in ib[:-1]:
                        out[j] = self.fresh(s, f"heads of a split width stay fixed (node {where})")
                        lead *= s
                    out[ib[-1][0]] = d.scaled(Fraction(1, lead))
                else:
                    self.uf.fix(d, f"reshape splits a concatenated width (node {where})")
                    for j, s in ib:
                        out[j] = self.fresh(s)
            elif len(ib) == 1:  # merge: a width times fixed sizes
                widths = [d for d in block_in if not self.uf.is_fixed(d)]
                const = 1
                for d in block_in:
                    if self.uf.is_fixed(d):
                        const *= self.size(d)
                if not widths:
                    out[ib[0][0]] = self.fresh(ib[0][1])
                elif len(widths) == 1:
                    out[ib[0][0]] = self.uf.resolve(widths[0]).scaled(const)
                else:
                    for d in widths:
                        self.uf.fix(d, f"reshape merges two widths (node {where})")
                    out[ib[0][0]] = self.fresh(ib[0][1])
            else:  # regroup, e.g. [batch, E] -> [batch * heads, head size]
                widths = [d for d in block_in if not self.uf.is_fixed(d)]
                last = self.uf.resolve(block_in[-1])
                if len(widths) == 1 and not self.uf.is_fixed(last) and len(last.segs) == 1:
                    # the innermost width carries over to the innermost output dim
                    lead_in = 1
                    for d in block_in[:-1]:
                        lead_in *= self.size(d)
                    lead_out = 1
                    for j, s in ib[:-1]:
                        out[j] = self.fresh(s, f"heads of a split width stay fixed (node {where})")
                        lead_out *= s
                    out[ib[-1][0]] = last.scaled(Fraction(lead_in, lead_out))
                else:
                    for d in block_in:
                        self.uf.fix(d, f"reshape regroups widths (node {where})")
                    for j, s in ib:
                        out[j] = self.fresh(s)
        return [d for d in out]

    op_flatten = reshape

    def op_cat(self, node):
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        ins = [self.dims(t) for t in tensors]
        if any(d is None for d in ins):
            raise _Unsupported("cat of unknown tensors")
        rank = len(ins[0])
        dim %= rank
        out = list(ins[0])
        for d in ins[1:]:
            for i in range(rank):
                if i != dim:
                    self.uf.tie(out[i], d[i], node.name)
        segs = []
        for d in ins:
            segs.extend(self.uf.resolve(d[dim]).segs)
        out[dim] = Dim(tuple(segs))
        return out

    op_concat = op_cat
    op_concatenate = op_cat

    def op_stack(self, node):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        ins = [self.dims(t) for t in tensors]
        if any(d is None for d in ins):
            raise _Unsupported("stack of unknown tensors")
        for d in ins[1:]:
            for i in range(len(d)):
                self.uf.tie(ins[0][i], d[i], node.name)
        out = list(ins[0])
        dim %= len(out) + 1
        out.insert(dim, self.fresh(len(ins)))
        return out

    def _split(self, node, pieces_sizes):
        dims = self.dims(node.args[0])
        shape = self.shape(node)
        if dims is None or not isinstance(shape, tuple):
            raise _Unsupported("split of an unknown tensor")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim %= len(dims)
        d = self.uf.resolve(dims[dim])
        n = len(shape)
        equal = len({s[dim] for s in shape}) == 1
        outs = []
        for s in shape:
            o = list(dims)
            if self.uf.is_fixed(d):
                o[dim] = self.fresh(s[dim])
            elif equal and len(d.segs) == 1:
                o[dim] = d.scaled(Fraction(1, n))
            else:
                self.uf.fix(d, f"uneven split of a width (node {node.name})")
                o[dim] = self.fresh(s[dim])
            outs.append(o)
        return tuple(outs)

    op_split = _split
    op_chunk = _split
    op_unbind = None  # handled by unknown -> fixes

    # ---- pooling, reductions
    def pool(self, node):
        dims = self.dims(node.args[0])
        shape = self.shape(node)
        if dims is None:
            raise _Unsupported("pooling of an unknown tensor")
        if isinstance(shape, tuple) and shape and isinstance(shape[0], tuple):  # (values, indices)
            return tuple(self._pool_out(node, dims, s) for s in shape)
        return self._pool_out(node, dims, shape)

    def _pool_out(self, node, dims, shape):
        if not _is_shape(shape) or len(shape) != len(dims):
            raise _Unsupported("pooling with unknown shapes")
        name = _op_name(node, self.gm)
        # 1-D ops pool the last dim only ([N, C, L]); the rest pool the last two
        n = 1 if "1d" in name else 2 if "2d" in name else max(1, min(2, len(dims) - 2))
        out = list(dims[:-n])
        out.extend(self.fresh(s, "spatial size") for s in shape[-n:])
        return out

    def op_mean(self, node):
        dims = self.dims(node.args[0])
        shape = self.shape(node)
        if dims is None or not _is_shape(shape):
            raise _Unsupported("reduction with unknown shapes")
        red = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if red is None:
            return [self.fresh(s) for s in shape]
        red = {r % len(dims) for r in ([red] if isinstance(red, int) else red)}
        out = []
        for i, d in enumerate(dims):
            if i in red:
                if keep:
                    out.append(self.fresh(1))
            else:
                out.append(d)
        if len(out) != len(shape):
            raise _Unsupported("reduction with unknown shapes")
        return out

    op_sum = op_mean
    op_amax = op_mean
    op_var = op_mean
    op_std = op_mean

    # ---- layers
    def _module(self, node):
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def _excluded(self, node, fqn, module) -> Optional[str]:
        if self.filter_fn is None:
            return None
        if not self.filter_fn(module, fqn):
            return f"excluded by filter_fn ({fqn})"
        return None

    def _param_arg(self, node, idx, name, suffix):
        """(dims, target) of a layer's weight/bias, module attribute or graph value."""
        mod = self._module(node)
        if mod is not None:
            t = getattr(mod, suffix, None)
            if t is None:
                return None, None
            target = f"{node.target}.{suffix}"
            return self.param(target, tuple(t.shape)), target
        arg = node.args[idx] if len(node.args) > idx else node.kwargs.get(name)
        if not isinstance(arg, fx.Node):
            return None, None
        target = arg.target if arg.op == "get_attr" else arg.name
        return self.dims(arg), target

    def _layer_fqn(self, node, weight_target):
        if node.op == "call_module":
            return node.target
        if weight_target and weight_target.endswith(".weight"):
            return weight_target[: -len(".weight")]
        return weight_target or node.name

    def op_linear(self, node):
        x = self.dims(node.args[0] if node.args else node.kwargs["input"])
        w, wt = self._param_arg(node, 1, "weight", "weight")
        b, bt = self._param_arg(node, 2, "bias", "bias")
        if x is None or w is None:
            raise _Unsupported("linear with unknown shapes")
        self.uf.tie(x[-1], w[1], node.name)
        if b is not None:
            self.uf.tie(b[0], w[0], node.name)
        self._record_layer(node, "linear", x[-1], w[0], 1, (), wt, bt)
        return list(x[:-1]) + [w[0]]

    def op_conv2d(self, node):
        return self._conv(node, 2)

    def op_conv1d(self, node):
        return self._conv(node, 1)

    def _conv(self, node, nk: int):
        """conv1d (``nk == 1``) or conv2d: the channel dim precedes ``nk`` spatial dims."""
        op = f"conv{nk}d"
        mod = self._module(node)
        x = self.dims(node.args[0] if node.args else node.kwargs["input"])
        w, wt = self._param_arg(node, 1, "weight", "weight")
        b, bt = self._param_arg(node, 2, "bias", "bias")
        shape = self.shape(node)
        if x is None or w is None or not _is_shape(shape):
            raise _Unsupported(f"{op} with unknown shapes")
        if mod is not None:
            groups = mod.groups
        else:
            groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        if not isinstance(groups, int):
            raise _Unsupported(f"{op} with a computed groups argument")
        cdim = len(x) - (nk + 1)
        cin = self.size(x[cdim])
        co = self.size(w[0])
        if groups == 1:
            self.uf.tie(x[cdim], w[1], node.name)
        elif groups == cin:  # depthwise: groups follow the width, out = multiplier x width
            self.uf.tie(w[0], self.uf.resolve(x[cdim]).scaled(Fraction(co, cin)), node.name)
        else:  # grouped: the number of groups stays, both widths must split into it
            self.uf.tie(w[1], self.uf.resolve(x[cdim]).scaled(Fraction(1, groups)), node.name)
            self.uf.requirements.append((w[0].scaled(Fraction(1, groups)), f"{node.name}: groups={groups}"))
        if b is not None:
            self.uf.tie(b[0], w[0], node.name)
        ks = tuple(self.size(d) for d in w[2:])
        for d in w[2:]:
            self.uf.fix(d, "kernel size")
        self._record_layer(node, op, x[cdim], w[0], groups, ks, wt, bt)
        out = list(x[:cdim]) + [w[0]] + [self.fresh(s, "spatial size") for s in shape[-nk:]]
        return out

    op_convolution = None

    def _record_layer(self, node, op, din, dout, groups, ks, wt, bt):
        fqn = self._layer_fqn(node, wt)
        excluded = self._excluded(node, fqn, self._module(node) or _owner(self.gm, wt))
        if excluded:
            self.uf.fix(din, excluded)
            self.uf.fix(dout, excluded)
        self.uf.mark_width(din)
        self.uf.mark_width(dout)
        x = node.args[0] if node.args else node.kwargs.get("input")
        self.layers[node.name] = dict(op=op, din=din, dout=dout, groups=groups, ks=ks,
                                      base_in=self.size(din), base_out=self.size(dout), fqn=fqn, x=x)
        self.layer_params[node.name] = (wt, bt)

    def _norm_params(self, node, channel: Dim, w_idx, b_idx, extra=()):
        for idx, name, suffix in ((w_idx, "weight", "weight"), (b_idx, "bias", "bias")) + tuple(extra):
            p, _ = self._param_arg(node, idx, name, suffix)
            if p is not None:
                self.uf.tie(p[0], channel, node.name)

    def op_batch_norm(self, node):
        x = self.dims(node.args[0])
        if x is None:
            raise _Unsupported("batch_norm of an unknown tensor")
        mod = self._module(node)
        if mod is not None:
            self._norm_params(node, x[1], 0, 0, (
                (0, "running_mean", "running_mean"), (0, "running_var", "running_var")))
        else:
            # F.batch_norm(x, running_mean, running_var, weight, bias) vs aten (x, w, b, rm, rv)
            aten = isinstance(node.target, torch._ops.OpOverload)
            idx = (1, 2, 3, 4) if aten else (3, 4, 1, 2)
            for i, nm in zip(idx, ("weight", "bias", "running_mean", "running_var")):
                p = self.dims(node.args[i] if len(node.args) > i else node.kwargs.get(nm))
                if p is not None:
                    self.uf.tie(p[0], x[1], node.name)
        return list(x)

    op__native_batch_norm_legit_no_training = None

    def op_layer_norm(self, node):
        x = self.dims(node.args[0])
        if x is None:
            raise _Unsupported("layer_norm of an unknown tensor")
        mod = self._module(node)
        if mod is not None:
            k = len(mod.normalized_shape)
            params = [self._param_arg(node, 0, n, n)[0] for n in ("weight", "bias")]
        else:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
            k = len(shape) if isinstance(shape, (list, tuple)) else 1
            params = [self.dims(node.args[i] if len(node.args) > i else node.kwargs.get(n))
                      for i, n in ((2, "weight"), (3, "bias"))]
        for p in params:
            if p is not None:
                for pd, xd in zip(p, x[-k:]):
                    self.uf.tie(pd, xd, node.name)
        return list(x)

    def op_group_norm(self, node):
        x = self.dims(node.args[0])
        if x is None:
            raise _Unsupported("group_norm of an unknown tensor")
        mod = self._module(node)
        if mod is not None:
            g = mod.num_groups
            params = [self._param_arg(node, 0, n, n)[0] for n in ("weight", "bias")]
        else:
            g = node.args[1] if len(node.args) > 1 else node.kwargs["num_groups"]
            params = [self.dims(node.args[i] if len(node.args) > i else node.kwargs.get(n))
                      for i, n in ((2, "weight"), (3, "bias"))]
        for p in params:
            if p is not None:
                self.uf.tie(p[0], x[1], node.name)
        self.uf.requirements.append((x[1].scaled(Fraction(1, g)), f"{node.name}: num_groups={g}"))
        return list(x)

    def op_embedding(self, node):
        mod = self._module(node)
        if mod is not None:
            idx = self.dims(node.args[0])
            w, _ = self._param_arg(node, 0, "weight", "weight")
        elif isinstance(node.target, torch._ops.OpOverload):  # aten.embedding(weight, indices)
            w, idx = self.dims(node.args[0]), self.dims(node.args[1])
        else:  # F.embedding(input, weight)
            idx = self.dims(node.args[0])
            w = self.dims(node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
        if idx is None or w is None:
            raise _Unsupported("embedding with unknown shapes")
        self.uf.fix(w[0], "vocabulary size")
        return list(idx) + [w[1]]

    def _matmul_dims(self, node, a, b):
        if a is None or b is None or len(a) < 2 or len(b) < 2:
            raise _Unsupported("matmul of vectors or unknown tensors")
        self.uf.tie(a[-1], b[-2], node.name)
        batch_shape = self.shape(node)
        if not _is_shape(batch_shape):
            raise _Unsupported("matmul with unknown shapes")
        batch = self.tie_broadcast([a[:-2], b[:-2]], batch_shape[:-2], node.name) if len(batch_shape) > 2 else []
        return batch + [a[-2], b[-1]]

    def op_matmul(self, node):
        return self._matmul_dims(node, self.dims(node.args[0]), self.dims(node.args[1]))

    op_bmm = op_matmul
    op_mm = op_matmul

    def op_scaled_dot_product_attention(self, node):
        q, k, v = (self.dims(node.args[i] if len(node.args) > i else node.kwargs.get(n))
                   for i, n in enumerate(("query", "key", "value")))
        shape = self.shape(node)
        if q is None or k is None or v is None or not _is_shape(shape):
            raise _Unsupported("attention with unknown shapes")
        self.uf.tie(q[-1], k[-1], node.name)
        self.uf.tie(k[-2], v[-2], node.name)
        batch = self.tie_broadcast([q[:-2], k[:-2], v[:-2]], shape[:-2], node.name)
        return batch + [q[-2], v[-1]]

    def op_einsum(self, node):
        raise _Unsupported("einsum")


class _Unsupported(Exception):
    pass


def _flat_args(node):
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, fx.Node))
        elif isinstance(a, fx.Node):
            out.append(a)
    return out


def _size_args(node) -> Optional[list]:
    """The size arguments of a view/reshape/expand call, as a list (or None)."""
    args = list(node.args[1:])
    if not args:
        s = node.kwargs.get("shape", node.kwargs.get("size"))
        return list(s) if isinstance(s, (list, tuple)) else None
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0])
    if len(args) == 1 and isinstance(args[0], fx.Node) and not isinstance(args[0].meta.get("val"), torch.Tensor):
        return None  # a shape tuple computed elsewhere: its elements are untracked
    return args


def _get_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _owner(gm, target):
    if not target or "." not in target:
        return gm
    try:
        return gm.get_submodule(target.rsplit(".", 1)[0])
    except AttributeError:
        return gm


# --------------------------------------------------------------------------- entry points


def _has_shapes(gm) -> bool:
    for node in gm.graph.nodes:
        if node.op == "placeholder" and _tensor_meta(node) is not None:
            return True
    return False


def _has_fake_values(gm) -> bool:
    """export/dynamo graphs carry every node's shape already (``val``/``example_value``)."""
    return any("val" in n.meta or "example_value" in n.meta for n in gm.graph.nodes if n.op == "placeholder")


def _propagate_shapes(gm, example_inputs) -> None:
    """ShapeProp in eval mode (shapes are the same; BN running stats stay untouched)."""
    from torch.fx.passes.shape_prop import ShapeProp

    modes = {m: m.training for m in gm.modules()}
    try:
        for m in gm.modules():
            m.training = False
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        for m, t in modes.items():
            m.training = t


def _guess_inputs(gm) -> Optional[tuple]:
    """One plausible input per placeholder, from the first conv/linear/embedding reading it."""
    guesses = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        guess = None
        for user in node.users:
            if user.op != "call_module":
                continue
            mod = gm.get_submodule(user.target)
            if isinstance(mod, nn.Conv2d):
                guess = torch.randn(2, mod.in_channels, 32, 32)
            elif isinstance(mod, nn.Conv1d):
                guess = torch.randn(2, mod.in_channels, 64)
            elif isinstance(mod, nn.Linear):
                guess = torch.randn(2, mod.in_features)
            elif isinstance(mod, nn.Embedding):
                guess = torch.randint(0, mod.num_embeddings, (2, 8))
            if guess is not None:
                break
        if guess is None:
            return None
        guesses.append(guess)
    return tuple(guesses)


def tie_channel_widths(gm: fx.GraphModule, M: int, example_inputs=None, *, filter_fn=None,
                       dense_input_layers: bool = True) -> ChannelWidths:
    """Analyse ``gm``: tie widths across the graph and decide each group's SWS width.

    Shapes come from the nodes' metadata (``val`` of export/dynamo graphs, ``tensor_meta`` of
    ShapeProp); with ``example_inputs`` ShapeProp runs first (in eval mode). ``filter_fn(module,
    fqn) -> bool`` keeps a layer out of SWS when it returns False (its widths stay).
    ``dense_input_layers`` (sasify's policy, the default) keeps the weight of a layer reading
    the raw network input dense: its output width still widens, but it has no 1:M mask
    (``sparse=False``). ``False`` masks it like every other widened layer.
    """
    from sas_compile.runtime.projection import check_M

    check_M(M)
    notes: List[str] = []
    if example_inputs is not None and not _has_fake_values(gm):
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        _propagate_shapes(gm, tuple(example_inputs))
    elif not _has_shapes(gm):
        guess = _guess_inputs(gm)
        try:
            if guess is None:
                raise RuntimeError("no conv/linear/embedding reads the inputs directly")
            _propagate_shapes(gm, guess)
            notes.append(
                "no example_inputs: shapes come from a guessed input "
                + ", ".join(str(tuple(g.shape)) for g in guess)
                + "; pass example_inputs for exact spatial sizes"
            )
        except Exception as err:  # noqa: BLE001 - the guess may not fit the model
            notes.append(f"no example_inputs and no guessable input shape ({err}); pass example_inputs")
    analysis = _Analysis(gm, M, filter_fn).run()
    raw = _raw_inputs(gm) if dense_input_layers else set()
    uf = analysis.uf
    if not _has_shapes(gm):
        for info in analysis.layers.values():
            uf.fix(info["din"], "shapes unknown: pass example_inputs")
            uf.fix(info["dout"], "shapes unknown: pass example_inputs")

    widths = _decide(uf, analysis, M)
    layers: Dict[str, SWSLayerWidths] = {}
    result = ChannelWidths(M, widths, {}, analysis.env, layers, analysis.layer_params,
                           analysis.params, notes + analysis.notes, uf)
    for root in range(len(uf.groups)):
        if uf.find(root) == root:
            g = uf.groups[root]
            result.reasons[root] = g.reason if g.fixed else (None if g.width else "no conv/linear width")
    for name, info in analysis.layers.items():
        cin = result.size_of(info["din"])
        cout = result.size_of(info["dout"])
        groups = info["groups"]
        if groups == info["base_in"] and groups > 1:
            groups = cin  # depthwise: groups follow the width
        fan_in = cin // groups
        for k in info["ks"]:
            fan_in *= k
        why = []
        if cin == info["base_in"]:
            why.append("input width stays: " + _dim_reason(uf, info["din"]))
        if cout == info["base_out"]:
            why.append("output width stays: " + _dim_reason(uf, info["dout"]))
        widened = len(why) < 2
        reads_input = info["x"] in raw
        if widened and reads_input:
            why.append("weight stays dense: the layer reads the raw network input "
                       "(dense_input_layers=True, as sasify)")
        layers[name] = SWSLayerWidths(
            in_channels=cin, out_channels=cout, in_features=fan_in, out_features=cout,
            groups=groups, widened=widened, reason="; ".join(why) or None,
            base_in_channels=info["base_in"], base_out_channels=info["base_out"],
            kernel_size=info["ks"], op=info["op"], M=M, sparse=widened and not reads_input,
            reads_network_input=reads_input,
        )
    log.debug("tie_channel_widths: %d layers, %d widened, %d sparse", len(layers),
              sum(1 for l in layers.values() if l.widened), sum(1 for l in layers.values() if l.sparse))
    return result


def _raw_inputs(gm: fx.GraphModule) -> set:
    """Nodes computed from the network inputs alone: sasify's notion (``find_sas_layers``)."""
    from .find_sas_layers import raw_input_nodes

    params = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val", node.meta.get("example_value"))
            # lifted parameters (dynamo graphs) are not network inputs; the analysis reads them as parameters
            if isinstance(val, nn.Parameter) or "_parameters_" in node.name or "_buffers_" in node.name:
                params.add(node.name)
    return raw_input_nodes(gm, params)


def _dim_reason(uf: _UnionFind, dim: Dim) -> str:
    reasons = []
    for g, _ in uf.resolve(dim).segs:
        grp = uf.groups[g]
        r = grp.reason if grp.fixed else ("no conv/linear width" if not grp.width else "widening rounds to the same size")
        if r and r not in reasons:
            reasons.append(r)
    return "; ".join(reasons) or "unknown"


def _decide(uf: _UnionFind, analysis: _Analysis, M: int) -> Dict[int, int]:
    """Widen every free width group, then fix groups whose segments stop being integral."""
    all_dims: List[Tuple[Dim, str]] = list(uf.requirements)

    def collect(value, where):
        if isinstance(value, Dim):
            all_dims.append((value, where))
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v, where)

    for name, value in analysis.env.items():
        collect(value, name)
    for target, dims in analysis.params.items():
        collect(dims, target)
    while True:
        widths = {}
        for g in range(len(uf.groups)):
            if uf.find(g) != g or g in uf.alias:
                continue
            grp = uf.groups[g]
            widths[g] = sws_width(grp.size, M) if (grp.width and not grp.fixed and grp.size > 0) else grp.size
        changed = False
        for dim, where in all_dims:
            d = uf.resolve(dim)
            total = sum((widths[g] * f for g, f in d.segs), Fraction(0))
            if total.denominator != 1:
                for g, f in d.segs:
                    if (widths[g] * f).denominator != 1 and not uf.groups[g].fixed:
                        uf.groups[g].fixed = True
                        uf.groups[g].reason = (
                            f"widened width {widths[g]} does not split into {f.denominator} "
                            f"(heads or groups) at {where}"
                        )
                        changed = True
        if not changed:
            # aliased roots: report the width of what they are a multiple of
            for g in uf.alias:
                widths[g] = int(sum((widths[h] * f for h, f in uf.resolve(Dim(((g, Fraction(1)),))).segs), Fraction(0)))
            return widths


def sws_layer_widths(gm: fx.GraphModule, M: int, example_inputs=None, *, filter_fn=None,
                     dense_input_layers: bool = True) -> Dict[str, SWSLayerWidths]:
    """SWS widths of every conv/linear call in ``gm``, keyed by node name (see :class:`SWSLayerWidths`).

    ``dense_input_layers`` as in :func:`tie_channel_widths` (a layer reading the raw network
    input keeps a dense weight by default).
    """
    return tie_channel_widths(gm, M, example_inputs, filter_fn=filter_fn,
                              dense_input_layers=dense_input_layers).layers


# the helpers the SWS rewrite shares with this analysis
op_name = _op_name
size_args = _size_args
get_attr = _get_attr
propagate_shapes = _propagate_shapes
