"""The width model of the SWS analysis: tensor dims as sums of width-group segments, tied by a union-find.

Why this module exists: SWS widens every hidden width by sqrt(M), but a width is shared by
everything that touches it. The per-op rules (``sws_width_rules``) describe each op as ties
between dims; this module is what they tie: a :class:`Dim` is a sum of segments
``(group, factor)`` whose size is ``sum(size(group) * factor)``, and :class:`WidthUnionFind`
merges groups that must be the same width, fixes groups that must keep their size (with the
reason) and makes one group a multiple of another when their structures differ. The result
types (:class:`SWSLayerWidths` per layer, :class:`ChannelWidths` per graph and M) live here
too, so the rules, the entry point and the rewrite share one vocabulary.

An ordinary dimension is one segment with factor 1; a concatenation keeps one segment per
input (widths add up); a flatten of ``[C, H, W]`` into a linear is ``(C, H*W)``; the head size
of a reshape into heads is ``(C, 1/heads)`` (heads stay, the head size follows the width).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Dict, List, Optional, Tuple

__all__ = [
    "Dim",
    "WidthGroup",
    "WidthUnionFind",
    "LayerSite",
    "SWSLayerWidths",
    "ChannelWidths",
]


@dataclass(frozen=True)
class Dim:
    """One tensor dimension: a sum of ``(group id, factor)`` segments."""

    segs: Tuple[Tuple[int, Fraction], ...]

    def scaled(self, k) -> "Dim":
        k = Fraction(k)
        return Dim(tuple((g, f * k) for g, f in self.segs))


@dataclass
class WidthGroup:
    """A set of tied widths: its size, whether it must keep it (and why), whether a layer reads it."""

    size: int
    fixed: bool = False
    reason: Optional[str] = None
    width: bool = False  # holds a conv/linear input or output width
    members: int = 1


class WidthUnionFind:
    """Width groups merged by ties; a group may instead become a multiple of another Dim (an alias)."""

    def __init__(self):
        self.parent: List[int] = []
        self.groups: List[WidthGroup] = []
        self.alias: Dict[int, Dim] = {}  # root -> the Dim its size is a multiple of
        self.requirements: List[Tuple[Dim, str]] = []  # dims that must stay integral

    def copy(self) -> "WidthUnionFind":
        """An independent copy: a per-M decision fixes groups without touching the analysis."""
        out = WidthUnionFind()
        out.parent = list(self.parent)
        out.groups = [copy.copy(g) for g in self.groups]
        out.alias = dict(self.alias)
        out.requirements = list(self.requirements)
        return out

    def new(self, size, *, fixed=False, reason=None) -> Dim:
        gid = len(self.parent)
        self.parent.append(gid)
        self.groups.append(WidthGroup(int(size), fixed, reason if fixed else None))
        return Dim(((gid, Fraction(1)),))

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def group(self, g: int) -> WidthGroup:
        return self.groups[self.find(g)]

    def resolve(self, dim: Dim) -> Dim:
        """``dim`` in root groups, aliases expanded."""
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

    def reason_of(self, dim: Dim) -> str:
        """Why ``dim`` keeps its size (its groups' reasons)."""
        reasons = []
        for g, _ in self.resolve(dim).segs:
            grp = self.groups[g]
            if grp.fixed:
                r = grp.reason
            else:
                r = "no conv/linear width" if not grp.width else "widening rounds to the same size"
            if r and r not in reasons:
                reasons.append(r)
        return "; ".join(reasons) or "unknown"

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


@dataclass
class LayerSite:
    """A conv/linear call the walk met: its input and output width dims and its structure."""

    op: str  # "linear" | "conv1d" | "conv2d"
    din: Dim
    dout: Dim
    groups: int
    kernel_size: Tuple[int, ...]
    base_in: int
    base_out: int
    fqn: str
    x: Any  # the input node (the raw-input policy reads it)
    weight_target: Optional[str]
    bias_target: Optional[str]


@dataclass
class SWSLayerWidths:
    """Widths of one conv/linear call site after SWS widening.

    ``in_channels``/``out_channels`` are the widened narrow widths (a conv's Cin/Cout, a
    linear's in/out features); ``fan_in`` is the per-output fan-in after widening
    (``in_channels/groups * kernel``), ``out_features == out_channels``. ``widened`` is True
    when either width changed. ``sparse`` is True when the weight is 1:M sparse, so its
    nonzeros (and mults per output position) are ``ceil(fan_in * out_features / M)``;
    a widened layer is sparse unless it reads the raw network input and
    ``dense_input_layers=True`` (sasify's policy: it keeps every one of its weights). A layer
    whose widths both stay is dense. ``reason`` says why a width stays or the weight stays
    dense (None when both widths widen and the weight is sparse).
    """

    in_channels: int
    out_channels: int
    fan_in: int
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
    def in_features(self) -> int:
        """Deprecated name of :attr:`fan_in` (``accounting.layer_costs`` and older callers read it)."""
        return self.fan_in

    @property
    def weight_numel(self) -> int:
        """Stored (dense) weight entries of the widened layer."""
        return self.out_features * self.fan_in

    @property
    def nonzeros(self) -> int:
        """Kept weights: ``ceil(fan_in*out/M)`` for a 1:M sparse layer, else all."""
        if not self.sparse:
            return self.weight_numel
        return -(-self.weight_numel // self.M)


@dataclass
class ChannelWidths:
    """What the analysis decided at one M: every node's dims, every group's width, every layer's widths."""

    M: int
    widths: Dict[int, int]  # group root -> widened width (== size when it stays)
    node_dims: Dict[str, Any]  # node name -> list[Dim] | tuple of those | Dim (int values) | None
    layers: Dict[str, SWSLayerWidths]
    layer_params: Dict[str, Tuple[Optional[str], Optional[str]]]  # node -> (weight, bias) targets
    param_dims: Dict[str, List[Dim]]  # parameter/buffer target -> dims
    notes: List[str] = field(default_factory=list)
    union_find: Optional[WidthUnionFind] = None  # this M's groups (the decision fixed some)
    unfollowed: Dict[str, str] = field(default_factory=dict)  # conv/linear node -> why the analysis could not follow it

    def size_of(self, dim: Dim) -> int:
        """Widened size of ``dim``."""
        total = Fraction(0)
        for g, f in self.union_find.resolve(dim).segs:
            total += self.widths[self.union_find.find(g)] * f
        if total.denominator != 1:  # pragma: no cover - excluded by the integrality fixpoint
            raise AssertionError(f"non-integral width {total}")
        return int(total)

    def base_size_of(self, dim: Dim) -> int:
        """Size of ``dim`` before widening."""
        return int(self.union_find.dim_size(dim))

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
