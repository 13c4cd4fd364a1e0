"""Per-op width rules of the SWS analysis: what each op says about the widths it reads and makes.

Why this module exists: whether a width can widen depends on every op that touches it, so
the analysis needs one rule per op, readable in one place. A rule takes the walk (the
graph's dims so far, see :class:`WidthWalk`) and a node, ties the dims of the node's inputs
that must stay equal (``walk.uf.tie``), fixes the ones that must keep their size
(``walk.uf.fix``, with the reason) and returns the node's own dims. An op no rule knows fixes
every width it touches, with its name as the reason, so the analysis never widens what it
does not understand.

The tables: conv/linear calls in every spelling are recognised by
``find_sas_layers.match_layer_call`` (:func:`layer`); :data:`MODULE_WIDTH_RULES` maps module
types (subclasses included) to rules; :data:`WIDTH_RULES` maps op names to rules: the one name
an op's function, method and ATen spellings share (``torch.relu``, ``F.relu``, ``x.relu()``
and ``aten.relu.default`` are all ``"relu"``), see :func:`op_name`.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from .capture import layer_owner, shape_tree
from .find_sas_layers import CONV_DIMS, LAYER_MODULES, LayerCall, match_layer_call, op_name, stores_weight
from .sws_width_model import Dim, LayerSite, WidthUnionFind

__all__ = [
    "Rule",
    "UnsupportedOp",
    "WidthWalk",
    "WIDTH_RULES",
    "MODULE_WIDTH_RULES",
    "LAYER_OPS",
    "op_name",
    "width_rule_for",
    "has_width_rule",
    "size_args",
    "graph_attr",
    "is_shape",
]

# what SWS widens and masks
LAYER_OPS = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


class UnsupportedOp(Exception):
    """A rule cannot describe this node: the walk fixes every width it touches, with this reason."""


def is_shape(x) -> bool:
    """A flat shape tuple of ints (not a nested one of a multi-output node)."""
    return isinstance(x, tuple) and all(isinstance(s, int) for s in x)


def graph_attr(gm: nn.Module, target: str):
    """The value a ``get_attr`` node reads (None when absent)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def size_args(node: fx.Node) -> Optional[list]:
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


def _owner(gm: nn.Module, target: Optional[str]) -> nn.Module:
    if not target or "." not in target:
        return gm
    try:
        return gm.get_submodule(target.rsplit(".", 1)[0])
    except AttributeError:
        return gm


def _flat_args(node: fx.Node) -> List[fx.Node]:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, fx.Node))
        elif isinstance(a, fx.Node):
            out.append(a)
    return out


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


# --------------------------------------------------------------------------- the walk


class WidthWalk:
    """The dims of every value of ``gm``, built by visiting its nodes once, in order, with the rules.

    ``env`` maps a node name to its value's dims: a list of :class:`Dim` for a tensor, a tuple
    of those for a multi-output node, a :class:`Dim` for an int that is a size, None for what
    is not tracked. ``params`` holds the dims of parameters and buffers by target, ``layers``
    every conv/linear call (:class:`LayerSite`), ``unfollowed`` the reason of every conv/linear call
    no rule could follow (its widths stay). ``filter_fn(module, fqn)`` returning False keeps
    a layer's widths; ``module`` is the one of the user's ``model`` where given
    (``capture.layer_owner``), else the graph's.
    """

    def __init__(self, gm: fx.GraphModule, filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                 model: Optional[nn.Module] = None):
        self.gm = gm
        self.filter_fn = filter_fn
        self.model = model
        self.uf = WidthUnionFind()
        self.env: Dict[str, Any] = {}
        self.params: Dict[str, List[Dim]] = {}
        self.layers: Dict[str, LayerSite] = {}
        self.unfollowed: Dict[str, str] = {}
        # id(tensor) -> (tensor, its dims), whatever it is called; the tensor kept alive so its id stays its own
        self._tensor_dims: Dict[int, Tuple[torch.Tensor, List[Dim]]] = {}

    # ---- dims
    def fresh(self, size, reason="not a channel width") -> Dim:
        """A dim that keeps its size."""
        return self.uf.new(size, fixed=True, reason=reason)

    def param(self, target: str, shape: Sequence[int], tensor: Optional[torch.Tensor] = None) -> List[Dim]:
        """The dims of a parameter/buffer, created free on first sight.

        One ``tensor`` under two names (a tied weight) has one set of dims: it widens as one.
        """
        dims = self.params.get(target)
        if dims is None:
            known = self._tensor_dims.get(id(tensor)) if tensor is not None else None
            dims = known[1] if known is not None else [self.uf.new(s) for s in shape]
            self.params[target] = dims
            if tensor is not None:
                self._tensor_dims.setdefault(id(tensor), (tensor, dims))
        return dims

    def dims(self, arg) -> Optional[List[Dim]]:
        """The dims of a tensor argument (None for anything else)."""
        if isinstance(arg, fx.Node):
            v = self.env.get(arg.name)
            return v if isinstance(v, list) else None
        return None

    def size(self, d: Dim) -> int:
        return int(self.uf.dim_size(d))

    def fix_all(self, value, reason: str) -> None:
        if isinstance(value, Dim):
            self.uf.fix(value, reason)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.fix_all(v, reason)

    def shape(self, node) -> Any:
        return shape_tree(node) if isinstance(node, fx.Node) else None

    def fresh_dims(self, shape, reason) -> Any:
        if is_shape(shape):
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

    def tie_size_args(self, node, out: List[Dim], args) -> None:
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

    # ---- modules and their parameters
    def module(self, node) -> Optional[nn.Module]:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def module_param(self, node, attr: str):
        """(dims, target) of a module call's parameter/buffer ``attr`` ((None, None) when absent)."""
        t = getattr(self.module(node), attr, None)
        if t is None:
            return None, None
        target = f"{node.target}.{attr}"
        return self.param(target, tuple(t.shape), t), target

    def value_param(self, arg):
        """(dims, target) of a parameter passed as a graph value ((None, None) when not a node)."""
        if not isinstance(arg, fx.Node):
            return None, None
        target = arg.target if arg.op == "get_attr" else arg.name
        return self.dims(arg), target

    def record_layer(self, node, op, din, dout, groups, ks, wt, bt, x) -> None:
        """Remember a conv/linear call; its widths are layer widths (and stay when filter_fn says so)."""
        fqn = node.target if node.op == "call_module" else (
            wt[: -len(".weight")] if wt and wt.endswith(".weight") else (wt or node.name))
        if self.filter_fn is not None:
            owner = layer_owner(self.model, fqn, self.module(node) or _owner(self.gm, wt))
            if not self.filter_fn(owner, fqn):
                excluded = f"excluded by filter_fn ({fqn})"
                self.uf.fix(din, excluded)
                self.uf.fix(dout, excluded)
        self.uf.mark_width(din)
        self.uf.mark_width(dout)
        self.layers[node.name] = LayerSite(op, din, dout, groups, ks, self.size(din), self.size(dout), fqn, x, wt, bt)

    # ---- the walk
    def run(self) -> "WidthWalk":
        for node in self.gm.graph.nodes:
            try:
                self.env[node.name] = self.visit(node)
            except UnsupportedOp as err:
                self.unsupported(node, str(err))
                if node.op in ("call_module", "call_function", "call_method") and width_rule_for(node, self.gm) is layer:
                    self.unfollowed[node.name] = str(err)
        return self

    def unsupported(self, node: fx.Node, why: str) -> None:
        reason = f"{why} (node {node.name})"
        for a in node.all_input_nodes:
            self.fix_all(self.env.get(a.name), reason)
        self.env[node.name] = self.fresh_dims(self.shape(node), reason)

    def visit(self, node: fx.Node):
        if node.op == "placeholder":
            shape = self.shape(node)
            val = node.meta.get("val", node.meta.get("example_value"))
            if isinstance(val, nn.Parameter) or "_parameters_" in node.name or "_buffers_" in node.name:
                if is_shape(shape):
                    return list(self.param(node.name, shape))  # a lifted parameter (dynamo graphs)
            if shape is None:
                return None
            return self.fresh_dims(shape, f"network input '{node.name}'")
        if node.op == "get_attr":
            val = graph_attr(self.gm, node.target)
            if isinstance(val, torch.Tensor):
                return list(self.param(node.target, tuple(val.shape), val))
            return None
        if node.op == "output":
            self.fix_all([self.env.get(a.name) for a in node.all_input_nodes], "network output")
            return None
        return width_rule_for(node, self.gm)(self, node)


# --------------------------------------------------------------------------- rules: values


def no_value(walk: WidthWalk, node: fx.Node):
    """Nothing to track (guards, asserts, ``x.dim()``)."""
    return None


def unknown_op(walk: WidthWalk, node: fx.Node):
    """No rule: python arithmetic on untracked values passes; anything on tensors fixes their widths."""
    tensor_in = any(isinstance(walk.env.get(a.name), (list, tuple)) for a in node.all_input_nodes)
    if not tensor_in and walk.shape(node) is None:
        return None
    mod = walk.module(node)
    raise UnsupportedOp(f"unsupported op {f'module:{type(mod).__name__}' if mod is not None else op_name(node)}")


def unsupported(why: str) -> "Rule":
    """A rule for an op the analysis refuses on purpose."""
    def rule(walk: WidthWalk, node: fx.Node):
        raise UnsupportedOp(why)
    return rule


def size_value(walk: WidthWalk, node: fx.Node):
    """``x.size()`` / ``x.size(d)`` / ``aten.sym_size``: the dims themselves, so reshapes can tie to them."""
    dims = walk.dims(node.args[0])
    if dims is None:
        return None
    d = _arg(node, 1, "dim")
    return tuple(dims) if d is None else dims[d]


def attribute_value(walk: WidthWalk, node: fx.Node):
    """``getattr(x, "shape" | "T" | "mT")``."""
    dims = walk.dims(node.args[0])
    if dims is None:
        return None
    if node.args[1] == "shape":
        return tuple(dims)
    if node.args[1] == "T":
        return dims[::-1]
    if node.args[1] == "mT":
        return dims[:-2] + [dims[-1], dims[-2]]
    return None


def floordiv(walk: WidthWalk, node: fx.Node):
    """``width // heads`` makes a head size; on tensors, elementwise."""
    a, b = node.args[0], node.args[1]
    da = walk.env.get(a.name) if isinstance(a, fx.Node) else None
    if isinstance(da, Dim) and isinstance(b, int):
        scaled = da.scaled(Fraction(1, b))
        walk.uf.requirements.append((scaled, f"{node.name}: width split by {b}"))
        return scaled
    if isinstance(da, list) or isinstance(walk.env.get(getattr(b, "name", None)), list):
        return elementwise(walk, node)
    return None


def mul(walk: WidthWalk, node: fx.Node):
    """``width * k`` scales a size; on tensors, elementwise."""
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
    da = walk.env.get(a.name) if isinstance(a, fx.Node) else None
    db = walk.env.get(b.name) if isinstance(b, fx.Node) else None
    if isinstance(da, Dim) and isinstance(b, int):
        return da.scaled(b)
    if isinstance(db, Dim) and isinstance(a, int):
        return db.scaled(a)
    if isinstance(da, list) or isinstance(db, list):
        return elementwise(walk, node)
    return None


# --------------------------------------------------------------------------- rules: indexing


def getitem(walk: WidthWalk, node: fx.Node):
    """An element of a tuple of dims (``x.shape[1]``, a split piece) or tensor indexing."""
    src, idx = node.args[0], node.args[1]
    value = walk.env.get(src.name) if isinstance(src, fx.Node) else None
    if isinstance(value, tuple):
        return value[idx] if isinstance(idx, (int, slice)) else None
    if isinstance(value, list):
        return _index_tensor(walk, node, value, idx)
    return None


def _index_tensor(walk: WidthWalk, node, dims: List[Dim], idx):
    if not isinstance(idx, tuple):
        idx = (idx,)
    out_shape = walk.shape(node)
    if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in idx) or not is_shape(out_shape):
        raise UnsupportedOp("tensor indexing")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out: List[Dim] = []
    pos = 0
    for i in idx:
        if i is Ellipsis:
            span = len(dims) - n_real
            out.extend(dims[pos:pos + span])
            pos += span
        elif i is None:
            out.append(walk.fresh(1))
        elif isinstance(i, int):
            if not walk.uf.is_fixed(dims[pos]):
                walk.uf.fix(dims[pos], f"indexing a single channel (node {node.name})")
            pos += 1
        elif isinstance(i, slice):
            if i == slice(None):
                out.append(dims[pos])
            else:
                walk.uf.fix(dims[pos], f"slicing a width (node {node.name})")
                out.append(walk.fresh(out_shape[len(out)]))
            pos += 1
        else:
            raise UnsupportedOp("tensor indexing")
    out.extend(dims[pos:])
    return out


def select(walk: WidthWalk, node: fx.Node):
    """Picking one index of a dim fixes that dim."""
    dims = walk.dims(node.args[0])
    if dims is None:
        raise UnsupportedOp("select of an unknown tensor")
    dim = _arg(node, 1, "dim") % len(dims)
    if not walk.uf.is_fixed(dims[dim]):
        walk.uf.fix(dims[dim], f"indexing a single channel (node {node.name})")
    return dims[:dim] + dims[dim + 1:]


def slice_dim(walk: WidthWalk, node: fx.Node):
    """A partial slice of a dim fixes it; a full one passes it through."""
    dims = walk.dims(node.args[0])
    shape = walk.shape(node)
    if dims is None or not is_shape(shape):
        raise UnsupportedOp("slice of an unknown tensor")
    dim = _arg(node, 1, "dim", 0) % len(dims)
    out = list(dims)
    if shape[dim] != walk.size(dims[dim]):
        walk.uf.fix(dims[dim], f"slicing a width (node {node.name})")
        out[dim] = walk.fresh(shape[dim])
    return out


# --------------------------------------------------------------------------- rules: elementwise, creation


def elementwise(walk: WidthWalk, node: fx.Node):
    """Every tensor input's dims tie with the output's, aligned from the right (broadcast dims excepted)."""
    out_shape = walk.shape(node)
    ins = [d for d in (walk.dims(a) for a in _flat_args(node)) if d is not None]
    if not ins:
        if out_shape is not None and is_shape(out_shape):
            return [walk.fresh(s, f"computed from constants (node {node.name})") for s in out_shape]
        return None
    if not is_shape(out_shape):
        if len(ins) == 1 and out_shape is None:
            return list(ins[0])
        raise UnsupportedOp("elementwise op with unknown output shape")
    return walk.tie_broadcast(ins, out_shape, node.name)


def created(walk: WidthWalk, node: fx.Node):
    """A tensor made from constants keeps its sizes."""
    return walk.fresh_dims(walk.shape(node), f"size set by a constant (node {node.name})")


def expand(walk: WidthWalk, node: fx.Node):
    """``expand``/``expand_as``/``repeat``: dims that keep their size pass through, new ones stay."""
    dims = walk.dims(node.args[0])
    out_shape = walk.shape(node)
    if dims is None or not is_shape(out_shape):
        raise UnsupportedOp("expand with unknown shapes")
    out = [walk.fresh(s, f"expanded (node {node.name})") for s in out_shape]
    for i, d in enumerate(dims):
        j = len(out_shape) - len(dims) + i
        if walk.size(d) == out_shape[j]:
            out[j] = d
    walk.tie_size_args(node, out, size_args(node))
    return out


# --------------------------------------------------------------------------- rules: permutations


def _permuted(walk: WidthWalk, node: fx.Node, order: Callable[[int], List[int]]):
    dims = walk.dims(node.args[0])
    if dims is None:
        raise UnsupportedOp("permute of an unknown tensor")
    return [dims[o] for o in order(len(dims))]


def reverse_dims(walk: WidthWalk, node: fx.Node):
    """``x.t()``."""
    return _permuted(walk, node, lambda rank: list(range(rank))[::-1])


def permute(walk: WidthWalk, node: fx.Node):
    """``x.permute(order)``."""
    def order(rank):
        o = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else list(node.args[1:])
        return [i % rank for i in o]
    return _permuted(walk, node, order)


def movedim(walk: WidthWalk, node: fx.Node):
    """``x.movedim(src, dst)``."""
    def order(rank):
        src, dst = node.args[1] % rank, node.args[2] % rank
        o = [i for i in range(rank) if i != src]
        o.insert(dst, src)
        return o
    return _permuted(walk, node, order)


def transpose(walk: WidthWalk, node: fx.Node):
    """``x.transpose(a, b)`` / ``swapaxes``."""
    def order(rank):
        a, b = _arg(node, 1, "dim0") % rank, _arg(node, 2, "dim1") % rank
        o = list(range(rank))
        o[a], o[b] = o[b], o[a]
        return o
    return _permuted(walk, node, order)


# --------------------------------------------------------------------------- rules: reshapes


def regroup(walk: WidthWalk, node: fx.Node):
    """Reshape without size arguments to tie (flatten, unflatten, squeeze, ``reshape_as``)."""
    dims = walk.dims(node.args[0])
    in_shape = walk.shape(node.args[0])
    out_shape = walk.shape(node)
    if dims is None or not is_shape(in_shape) or not is_shape(out_shape):
        raise UnsupportedOp("reshape with unknown shapes")
    return _regroup(walk, node, dims, in_shape, out_shape)


def view(walk: WidthWalk, node: fx.Node):
    """``view``/``reshape``: regroup, and tie sizes passed as graph values (``x.size(1) // heads``)."""
    out = regroup(walk, node)
    walk.tie_size_args(node, out, size_args(node))
    return out


def _regroup(walk: WidthWalk, node, dims, in_shape, out_shape) -> List[Dim]:
    """Match runs of input dims to runs of output dims with equal products."""
    uf, where = walk.uf, node.name
    out: List[Optional[Dim]] = [None] * len(out_shape)
    ins = [(i, s) for i, s in enumerate(in_shape) if s != 1]
    outs = [(j, s) for j, s in enumerate(out_shape) if s != 1]
    for j, s in enumerate(out_shape):
        if s == 1:
            out[j] = walk.fresh(1)
    a = b = 0
    while a < len(ins) or b < len(outs):
        ia, ib = [ins[a]] if a < len(ins) else [], [outs[b]] if b < len(outs) else []
        if not ia or not ib:
            raise UnsupportedOp("reshape with mismatched sizes")
        pa, pb = ia[0][1], ib[0][1]
        a, b = a + 1, b + 1
        while pa != pb:
            if pa < pb:
                if a >= len(ins):
                    raise UnsupportedOp("reshape with mismatched sizes")
                ia.append(ins[a]); pa *= ins[a][1]; a += 1
            else:
                if b >= len(outs):
                    raise UnsupportedOp("reshape with mismatched sizes")
                ib.append(outs[b]); pb *= outs[b][1]; b += 1
        block_in = [dims[i] for i, _ in ia]
        if len(ia) == 1 and len(ib) == 1:
            out[ib[0][0]] = block_in[0]
        elif len(ia) == 1:  # split: the last (innermost) output dim carries the width
            d = uf.resolve(block_in[0])
            if uf.is_fixed(d):
                for j, s in ib:
                    out[j] = walk.fresh(s)
            elif len(d.segs) == 1:
                lead = 1
                for j, s in ib[:-1]:
                    out[j] = walk.fresh(s, f"heads of a split width stay fixed (node {where})")
                    lead *= s
                out[ib[-1][0]] = d.scaled(Fraction(1, lead))
            else:
                uf.fix(d, f"reshape splits a concatenated width (node {where})")
                for j, s in ib:
                    out[j] = walk.fresh(s)
        elif len(ib) == 1:  # merge: a width times fixed sizes
            widths = [d for d in block_in if not uf.is_fixed(d)]
            const = 1
            for d in block_in:
                if uf.is_fixed(d):
                    const *= walk.size(d)
            if not widths:
                out[ib[0][0]] = walk.fresh(ib[0][1])
            elif len(widths) == 1:
                out[ib[0][0]] = uf.resolve(widths[0]).scaled(const)
            else:
                for d in widths:
                    uf.fix(d, f"reshape merges two widths (node {where})")
                out[ib[0][0]] = walk.fresh(ib[0][1])
        else:  # regroup, e.g. [batch, E] -> [batch * heads, head size]
            widths = [d for d in block_in if not uf.is_fixed(d)]
            last = uf.resolve(block_in[-1])
            if len(widths) == 1 and not uf.is_fixed(last) and len(last.segs) == 1:
                # the innermost width carries over to the innermost output dim
                lead_in = 1
                for d in block_in[:-1]:
                    lead_in *= walk.size(d)
                lead_out = 1
                for j, s in ib[:-1]:
                    out[j] = walk.fresh(s, f"heads of a split width stay fixed (node {where})")
                    lead_out *= s
                out[ib[-1][0]] = last.scaled(Fraction(lead_in, lead_out))
            else:
                for d in block_in:
                    uf.fix(d, f"reshape regroups widths (node {where})")
                for j, s in ib:
                    out[j] = walk.fresh(s)
    return list(out)


def cat(walk: WidthWalk, node: fx.Node):
    """Concatenation: the other dims tie; the joined dim keeps one segment per input (widths add up)."""
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    dim = _arg(node, 1, "dim", 0)
    ins = [walk.dims(t) for t in tensors]
    if any(d is None for d in ins):
        raise UnsupportedOp("cat of unknown tensors")
    rank = len(ins[0])
    dim %= rank
    out = list(ins[0])
    for d in ins[1:]:
        for i in range(rank):
            if i != dim:
                walk.uf.tie(out[i], d[i], node.name)
    segs = []
    for d in ins:
        segs.extend(walk.uf.resolve(d[dim]).segs)
    out[dim] = Dim(tuple(segs))
    return out


def stack(walk: WidthWalk, node: fx.Node):
    """Stacking: all dims tie; the new dim (the count) stays."""
    tensors = node.args[0]
    dim = _arg(node, 1, "dim", 0)
    ins = [walk.dims(t) for t in tensors]
    if any(d is None for d in ins):
        raise UnsupportedOp("stack of unknown tensors")
    for d in ins[1:]:
        for i in range(len(d)):
            walk.uf.tie(ins[0][i], d[i], node.name)
    out = list(ins[0])
    dim %= len(out) + 1
    out.insert(dim, walk.fresh(len(ins)))
    return out


def split(walk: WidthWalk, node: fx.Node):
    """``split``/``chunk`` into equal pieces: each piece is a fraction of the width; uneven splits fix it."""
    dims = walk.dims(node.args[0])
    shape = walk.shape(node)
    if dims is None or not isinstance(shape, tuple):
        raise UnsupportedOp("split of an unknown tensor")
    dim = _arg(node, 2, "dim", 0) % len(dims)
    d = walk.uf.resolve(dims[dim])
    n = len(shape)
    equal = len({s[dim] for s in shape}) == 1
    outs = []
    for s in shape:
        o = list(dims)
        if walk.uf.is_fixed(d):
            o[dim] = walk.fresh(s[dim])
        elif equal and len(d.segs) == 1:
            o[dim] = d.scaled(Fraction(1, n))
        else:
            walk.uf.fix(d, f"uneven split of a width (node {node.name})")
            o[dim] = walk.fresh(s[dim])
        outs.append(o)
    return tuple(outs)


# --------------------------------------------------------------------------- rules: pooling, reductions


def _pool(walk: WidthWalk, node: fx.Node, spatial: Optional[int]):
    """Channels pass through; the ``spatial`` trailing dims (all but batch and channel when None) stay."""
    dims = walk.dims(node.args[0])
    shape = walk.shape(node)
    if dims is None:
        raise UnsupportedOp("pooling of an unknown tensor")
    n = spatial if spatial is not None else max(1, min(2, len(dims) - 2))

    def out_dims(s):
        if not is_shape(s) or len(s) != len(dims):
            raise UnsupportedOp("pooling with unknown shapes")
        if any(walk.size(d) != size for d, size in zip(dims[:-n], s[:-n])):  # pixel_shuffle, padding channels
            raise UnsupportedOp(f"{op_name(node)} changes the channel dim")
        return list(dims[:-n]) + [walk.fresh(size, "spatial size") for size in s[-n:]]

    if isinstance(shape, tuple) and shape and isinstance(shape[0], tuple):  # (values, indices)
        return tuple(out_dims(s) for s in shape)
    return out_dims(shape)


def pool_1d(walk: WidthWalk, node: fx.Node):
    """1-D pooling/resizing of ``[N, C, L]``."""
    return _pool(walk, node, 1)


def pool_2d(walk: WidthWalk, node: fx.Node):
    """2-D pooling/resizing of ``[N, C, H, W]``."""
    return _pool(walk, node, 2)


def pool_3d(walk: WidthWalk, node: fx.Node):
    """3-D pooling/resizing of ``[N, C, D, H, W]``."""
    return _pool(walk, node, 3)


def pool_spatial(walk: WidthWalk, node: fx.Node):
    """Interpolation and pixel shuffle: the trailing spatial dims (one or two) change."""
    return _pool(walk, node, None)


def pad(walk: WidthWalk, node: fx.Node):
    """``F.pad`` / ``constant_pad_nd``: the amounts pair with the trailing dims, last first; a dim
    padded by (0, 0) passes through (Swin pads its ``[N, H, W, C]`` windows so, channels last),
    a padded one keeps its size and holds its input at its size too (a padded channel dim
    cannot widen)."""
    dims = walk.dims(node.args[0])
    shape = walk.shape(node)
    amounts = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if (dims is None or not is_shape(shape) or len(shape) != len(dims) or not isinstance(amounts, (list, tuple))
            or not all(isinstance(a, int) for a in amounts) or len(amounts) % 2 or len(amounts) // 2 > len(dims)):
        raise UnsupportedOp("pad with unknown shapes or amounts")
    out = list(dims)
    for i in range(len(amounts) // 2):
        d = len(dims) - 1 - i
        if amounts[2 * i] or amounts[2 * i + 1]:
            walk.uf.fix(dims[d], f"padded by {op_name(node)} (node {node.name})")
            out[d] = walk.fresh(shape[d], "padded size")
    return out


def reduce(walk: WidthWalk, node: fx.Node):
    """``mean``/``sum``/``amax``/``var``/``std`` over some dims: the others pass through."""
    dims = walk.dims(node.args[0])
    shape = walk.shape(node)
    if dims is None or not is_shape(shape):
        raise UnsupportedOp("reduction with unknown shapes")
    red = _arg(node, 1, "dim")
    keep = _arg(node, 2, "keepdim", False)
    if red is None:
        return [walk.fresh(s) for s in shape]
    red = {r % len(dims) for r in ([red] if isinstance(red, int) else red)}
    out = []
    for i, d in enumerate(dims):
        if i in red:
            if keep:
                out.append(walk.fresh(1))
        else:
            out.append(d)
    if len(out) != len(shape):
        raise UnsupportedOp("reduction with unknown shapes")
    return out


# --------------------------------------------------------------------------- rules: layers


def layer(walk: WidthWalk, node: fx.Node):
    """A linear / conv1d-3d / conv_transpose1d-3d call in any spelling (``find_sas_layers.match_layer_call``)."""
    call = match_layer_call(node, walk.gm)
    if call.module is not None and not stores_weight(call.module):
        raise UnsupportedOp(f"{type(call.module).__name__}.weight is computed before each call (weight_norm, "
                            "spectral_norm or a parametrization): its widths cannot change")
    if call.module is not None:
        w, wt = walk.module_param(node, "weight")
        b, bt = walk.module_param(node, "bias")
    else:
        w, wt = walk.value_param(call.weight)
        b, bt = walk.value_param(call.bias)
    x = walk.dims(call.x)
    if call.op == "linear":
        if x is None or w is None:
            raise UnsupportedOp("linear with unknown shapes")
        walk.uf.tie(x[-1], w[1], node.name)
        if b is not None:
            walk.uf.tie(b[0], w[0], node.name)
        walk.record_layer(node, "linear", x[-1], w[0], 1, (), wt, bt, call.x)
        return list(x[:-1]) + [w[0]]
    if call.op not in LAYER_OPS:
        raise UnsupportedOp(call.unsupported_reason or f"{call.op} is not supported")
    return _conv(walk, node, call, x, w, wt, b, bt)


def _conv(walk: WidthWalk, node, call: LayerCall, x, w, wt, b, bt):
    """conv1d-3d and conv_transpose1d-3d: the channel dim precedes ``nk`` spatial dims."""
    op, nk = call.op, CONV_DIMS[call.op]
    shape = walk.shape(node)
    if x is None or w is None or not is_shape(shape):
        raise UnsupportedOp(f"{op} with unknown shapes")
    groups, uf = call.groups, walk.uf
    cdim = len(x) - (nk + 1)
    channels = (_transposed_channels if "transpose" in op else _conv_channels)(uf, node.name, x[cdim], w, groups)
    if b is not None:
        uf.tie(b[0], channels, node.name)
    ks = tuple(walk.size(d) for d in w[2:])
    for d in w[2:]:
        uf.fix(d, "kernel size")
    walk.record_layer(node, op, x[cdim], channels, groups, ks, wt, bt, call.x)
    return list(x[:cdim]) + [channels] + [walk.fresh(s, "spatial size") for s in shape[-nk:]]


def _conv_channels(uf: WidthUnionFind, where: str, x: Dim, w, groups: int) -> Dim:
    """A convolution's weight ``[out, in/groups, *kernel]``: ties it to the input width ``x``;
    returns the output width (``w[0]``)."""
    cin, co = int(uf.dim_size(x)), int(uf.dim_size(w[0]))
    if groups == 1:
        uf.tie(x, w[1], where)
    elif groups == cin:  # depthwise: groups follow the width, out = multiplier x width
        uf.tie(w[0], uf.resolve(x).scaled(Fraction(co, cin)), where)
    else:  # grouped: the number of groups stays, both widths must split into it
        uf.tie(w[1], uf.resolve(x).scaled(Fraction(1, groups)), where)
        uf.requirements.append((w[0].scaled(Fraction(1, groups)), f"{where}: groups={groups}"))
    return w[0]


def _transposed_channels(uf: WidthUnionFind, where: str, x: Dim, w, groups: int) -> Dim:
    """A transposed convolution's weight ``[in, out/groups, *kernel]``: dim 0 ties the input
    width ``x``; returns the output width, ``groups * w[1]``."""
    cin, co = int(uf.dim_size(x)), int(uf.dim_size(w[1])) * groups
    uf.tie(x, w[0], where)
    if groups == 1:
        return w[1]
    if groups == cin:  # depthwise: groups follow the width, out = multiplier x width (w[1] stays)
        return uf.resolve(x).scaled(Fraction(co, cin))
    # grouped: the number of groups stays, both widths must split into it
    uf.requirements.append((uf.resolve(x).scaled(Fraction(1, groups)), f"{where}: groups={groups}"))
    return w[1].scaled(groups)


# --------------------------------------------------------------------------- rules: normalisation, embedding


def _tie_params(walk: WidthWalk, node, params, channel: Dim) -> None:
    for p in params:
        if p is not None:
            walk.uf.tie(p[0], channel, node.name)


def batch_norm(walk: WidthWalk, node: fx.Node):
    """``F.batch_norm`` / ``aten.batch_norm``: weight, bias and running stats tie to the channel dim."""
    x = walk.dims(node.args[0])
    if x is None:
        raise UnsupportedOp("batch_norm of an unknown tensor")
    # F.batch_norm(x, running_mean, running_var, weight, bias) vs aten (x, w, b, rm, rv)
    aten = isinstance(node.target, torch._ops.OpOverload)
    idx = (1, 2, 3, 4) if aten else (3, 4, 1, 2)
    names = ("weight", "bias", "running_mean", "running_var")
    _tie_params(walk, node, [walk.dims(_arg(node, i, n)) for i, n in zip(idx, names)], x[1])
    return list(x)


def batch_norm_module(walk: WidthWalk, node: fx.Node):
    """``nn.BatchNorm1d/2d``: its parameters and running stats tie to the channel dim."""
    x = walk.dims(node.args[0])
    if x is None:
        raise UnsupportedOp("batch_norm of an unknown tensor")
    names = ("weight", "bias", "running_mean", "running_var")
    _tie_params(walk, node, [walk.module_param(node, n)[0] for n in names], x[1])
    return list(x)


def _layer_norm(walk: WidthWalk, node, x, k: int, params) -> List[Dim]:
    for p in params:
        if p is not None:
            for pd, xd in zip(p, x[-k:]):
                walk.uf.tie(pd, xd, node.name)
    return list(x)


def layer_norm(walk: WidthWalk, node: fx.Node):
    """``F.layer_norm``: the normalised trailing dims tie to the weight's and bias's."""
    x = walk.dims(node.args[0])
    if x is None:
        raise UnsupportedOp("layer_norm of an unknown tensor")
    shape = _arg(node, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    return _layer_norm(walk, node, x, k, [walk.dims(_arg(node, 2, "weight")), walk.dims(_arg(node, 3, "bias"))])


def layer_norm_module(walk: WidthWalk, node: fx.Node):
    """``nn.LayerNorm``: the normalised trailing dims tie to its weight's and bias's."""
    x = walk.dims(node.args[0])
    if x is None:
        raise UnsupportedOp("layer_norm of an unknown tensor")
    k = len(walk.module(node).normalized_shape)
    return _layer_norm(walk, node, x, k, [walk.module_param(node, n)[0] for n in ("weight", "bias")])


def _group_norm(walk: WidthWalk, node, x, groups: int, params) -> List[Dim]:
    _tie_params(walk, node, params, x[1])
    walk.uf.requirements.append((x[1].scaled(Fraction(1, groups)), f"{node.name}: num_groups={groups}"))
    return list(x)


def group_norm(walk: WidthWalk, node: fx.Node):
    """``F.group_norm``: parameters tie to the channel dim, which must split into ``num_groups``."""
    x = walk.dims(node.args[0])
    if x is None:
        raise UnsupportedOp("group_norm of an unknown tensor")
    groups = _arg(node, 1, "num_groups")
    return _group_norm(walk, node, x, groups, [walk.dims(_arg(node, 2, "weight")), walk.dims(_arg(node, 3, "bias"))])


def group_norm_module(walk: WidthWalk, node: fx.Node):
    """``nn.GroupNorm``: parameters tie to the channel dim, which must split into ``num_groups``."""
    x = walk.dims(node.args[0])
    if x is None:
        raise UnsupportedOp("group_norm of an unknown tensor")
    groups = walk.module(node).num_groups
    return _group_norm(walk, node, x, groups, [walk.module_param(node, n)[0] for n in ("weight", "bias")])


def _embedding(walk: WidthWalk, idx, w) -> List[Dim]:
    if idx is None or w is None:
        raise UnsupportedOp("embedding with unknown shapes")
    walk.uf.fix(w[0], "vocabulary size")
    return list(idx) + [w[1]]


def embedding(walk: WidthWalk, node: fx.Node):
    """``F.embedding(input, weight)`` / ``aten.embedding(weight, indices)``: the vocabulary stays."""
    if isinstance(node.target, torch._ops.OpOverload):
        return _embedding(walk, walk.dims(node.args[1]), walk.dims(node.args[0]))
    return _embedding(walk, walk.dims(node.args[0]), walk.dims(_arg(node, 1, "weight")))


def embedding_module(walk: WidthWalk, node: fx.Node):
    """``nn.Embedding``: the vocabulary stays, the embedding width is free."""
    return _embedding(walk, walk.dims(node.args[0]), walk.module_param(node, "weight")[0])


# --------------------------------------------------------------------------- rules: products


def matmul(walk: WidthWalk, node: fx.Node):
    """``a @ b``: a's last dim ties to b's second last; batch dims broadcast."""
    a, b = walk.dims(node.args[0]), walk.dims(node.args[1])
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        raise UnsupportedOp("matmul of vectors or unknown tensors")
    walk.uf.tie(a[-1], b[-2], node.name)
    batch_shape = walk.shape(node)
    if not is_shape(batch_shape):
        raise UnsupportedOp("matmul with unknown shapes")
    batch = walk.tie_broadcast([a[:-2], b[:-2]], batch_shape[:-2], node.name) if len(batch_shape) > 2 else []
    return batch + [a[-2], b[-1]]


def attention(walk: WidthWalk, node: fx.Node):
    """``scaled_dot_product_attention``: q and k share the head size, k and v the sequence."""
    q, k, v = (walk.dims(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    shape = walk.shape(node)
    if q is None or k is None or v is None or not is_shape(shape):
        raise UnsupportedOp("attention with unknown shapes")
    walk.uf.tie(q[-1], k[-1], node.name)
    walk.uf.tie(k[-2], v[-2], node.name)
    batch = walk.tie_broadcast([q[:-2], k[:-2], v[:-2]], shape[:-2], node.name)
    return batch + [q[-2], v[-1]]


# --------------------------------------------------------------------------- the tables

Rule = Callable[[WidthWalk, fx.Node], Any]

# ops whose output dims are their inputs' (broadcast from the right)
ELEMENTWISE_OPS = (
    # activations, dropouts, casts, copies
    "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "leaky_relu", "elu",
    "selu", "celu", "mish", "softplus", "hardtanh", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
    "feature_dropout", "native_dropout", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "erf", "square",
    "reciprocal", "clone", "detach", "contiguous", "float", "half", "bfloat16", "double", "to", "type", "type_as",
    "_to_copy", "alias", "softmax", "log_softmax", "_softmax", "_log_softmax", "clamp", "clamp_min", "clamp_max",
    "identity", "lift_fresh_copy", "sign", "floor", "ceil", "round", "cos", "sin", "pow", "cpu", "cuda",
    "requires_grad_", "_assert_tensor_metadata", "masked_fill", "logical_not", "bitwise_not", "sigmoid_", "tanh_",
    "gelu_", "silu_", "hardswish_", "dropout_",
    # returns (out, mean, rstd): the unknown output shape makes the rule fix its widths
    "_native_batch_norm_legit_no_training",
    # binary
    "add", "sub", "div", "true_divide", "rsub", "maximum", "minimum", "where", "eq", "ne", "lt", "le", "gt",
    "ge", "logical_and", "logical_or", "bitwise_and", "bitwise_or", "and_", "or_", "truediv", "iadd", "isub",
    "imul", "itruediv", "fmod", "remainder", "addcmul", "lerp", "masked_fill_", "mul_", "add_", "sub_", "div_",
    "clamp_",
)
CREATION_OPS = (
    "zeros", "ones", "full", "empty", "arange", "rand", "randn", "zeros_like", "ones_like", "full_like",
    "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "tensor", "scalar_tensor", "randn_like",
    "rand_like", "linspace", "eye", "tril", "triu",
)
POOL_1D_OPS = (
    "max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d", "max_pool1d_with_indices",
    "lp_pool1d", "upsample_nearest1d", "upsample_linear1d",
)
POOL_2D_OPS = (
    "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "max_pool2d_with_indices",
    "lp_pool2d", "_adaptive_avg_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
)
POOL_3D_OPS = (
    "max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool3d", "max_pool3d_with_indices",
    "lp_pool3d", "_adaptive_avg_pool3d", "upsample_nearest3d", "upsample_trilinear3d",
)
# export's guards and asserts, autocast and grad-mode markers
NOOP_OPS = ("_guards_fn", "_assert_async", "_assert_scalar", "sym_constrain_range_for_size",
            "_set_grad_enabled", "_enter_autocast", "_exit_autocast")

WIDTH_RULES: Dict[str, Rule] = {
    **dict.fromkeys(NOOP_OPS, no_value),
    # sizes: tracked so that a reshape to ``x.size(1) // heads`` ties to the width
    "size": size_value, "sym_size": size_value, "getattr": attribute_value, "dim": no_value, "numel": no_value,
    "floordiv": floordiv, "mul": mul,
    # indexing
    "getitem": getitem, "select": select, "slice": slice_dim,
    # elementwise and creation
    **dict.fromkeys(ELEMENTWISE_OPS, elementwise),
    **dict.fromkeys(CREATION_OPS, created),
    "expand": expand, "expand_as": expand, "repeat": expand,
    # permutations
    "permute": permute, "transpose": transpose, "transpose_": transpose, "swapaxes": transpose,
    "movedim": movedim, "t": reverse_dims,
    # reshapes, joins, splits
    "view": view, "reshape": view, "_unsafe_view": view,
    **dict.fromkeys(("view_as", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "squeeze_",
                     "unsqueeze_"), regroup),
    "cat": cat, "concat": cat, "concatenate": cat, "stack": stack, "split": split, "chunk": split,
    # pooling, resizing, reductions
    **dict.fromkeys(POOL_1D_OPS, pool_1d),
    **dict.fromkeys(POOL_2D_OPS, pool_2d),
    **dict.fromkeys(POOL_3D_OPS, pool_3d),
    **dict.fromkeys(("interpolate", "pixel_shuffle"), pool_spatial),
    "pad": pad, "constant_pad_nd": pad,
    **dict.fromkeys(("mean", "sum", "amax", "var", "std"), reduce),
    # normalisation, embedding, products
    "batch_norm": batch_norm, "layer_norm": layer_norm, "group_norm": group_norm, "embedding": embedding,
    "matmul": matmul, "bmm": matmul, "mm": matmul, "scaled_dot_product_attention": attention,
    "einsum": unsupported("einsum"),
}

MODULE_WIDTH_RULES: Dict[type, Rule] = {
    nn.BatchNorm1d: batch_norm_module, nn.BatchNorm2d: batch_norm_module, nn.BatchNorm3d: batch_norm_module,
    nn.LayerNorm: layer_norm_module,
    nn.GroupNorm: group_norm_module, nn.Embedding: embedding_module, nn.Flatten: regroup,
    nn.MaxPool1d: pool_1d, nn.AvgPool1d: pool_1d, nn.AdaptiveAvgPool1d: pool_1d, nn.AdaptiveMaxPool1d: pool_1d,
    nn.MaxPool2d: pool_2d, nn.AvgPool2d: pool_2d, nn.AdaptiveAvgPool2d: pool_2d, nn.AdaptiveMaxPool2d: pool_2d,
    nn.MaxPool3d: pool_3d, nn.AvgPool3d: pool_3d, nn.AdaptiveAvgPool3d: pool_3d, nn.AdaptiveMaxPool3d: pool_3d,
    **dict.fromkeys((nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU,
                     nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softmax,
                     nn.Hardtanh, nn.Softplus), elementwise),
}


def _module_rule(module: nn.Module) -> Optional[Rule]:
    for cls in type(module).__mro__:
        if cls in MODULE_WIDTH_RULES:
            return MODULE_WIDTH_RULES[cls]
    return None


def has_width_rule(module: nn.Module) -> bool:
    """Whether the analysis sees into a call of ``module`` (a conv/linear layer, transposed
    convolutions included, or a module with a rule)."""
    return isinstance(module, LAYER_MODULES) or _module_rule(module) is not None


def width_rule_for(node: fx.Node, gm: fx.GraphModule) -> Rule:
    """The rule of a call node: conv/linear first, then by module type or op name; :func:`unknown_op` else."""
    if node.op == "call_module" and node.target in NOOP_OPS:  # export's guard check is a submodule call
        return no_value
    try:
        if match_layer_call(node, gm) is not None:
            return layer
    except (TypeError, ValueError):  # match_layer_call takes int(groups): here a graph value
        return unsupported("conv with a computed groups argument")
    if node.op == "call_module":
        return _module_rule(gm.get_submodule(node.target)) or unknown_op
    return WIDTH_RULES.get(op_name(node), unknown_op)
