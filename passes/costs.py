"""Mult and parameter formulas: the one table every count in sas-compile comes from.

Why a pass-level module: the analysis passes (the SWS width decision), ``report``,
``inspect``, the accounting functions of the user API and SWAT all count with these
formulas; living below the user API, every layer of the package can use them without
importing upwards. In the style of ``torch.utils.flop_counter``, a formula is registered
per (op, method): ops ``linear``, ``conv1d``-``conv3d``, ``conv_transpose1d``-``conv_transpose3d`` (a
transposed convolution counted per *input* position); methods ``base``, ``sas``, ``sws``,
``swat``. A formula reads the layer's geometry (any object with ``op``, ``in_channels``,
``out_channels``, ``kernel_size``, ``groups``, ``has_bias``: a ``LayerPlan`` or a
:class:`Geometry`) and never branches on the op: the fan-in ``Cin/groups * prod(kernel)``
covers all of them, which is how conv1d stopped being counted as a linear layer.

The paper's "mult count" is multiply-accumulates of conv/linear layers (not 2x FLOPs); params
are stored weights and biases. Every size may be an int or a sympy expression.

- base: ``Co * Cbar`` mults per output position, ``Cbar = Cin/groups * prod(kernel)``.
- SAS at M: mults equal base (one of every M projected activations is nonzero); params
  ``M * weight + bias``.
- SWS at M: widths ``round(sqrt(M) * C)`` (round half up), weights 1:M sparse; mults per
  output position ``ceil(fan_in * Co / M)`` (the paper counts a last partial chunk as one
  nonzero); params reported both as stored dense and as nonzeros.
- SWAT at (weight density, activation density): forward and input-gradient mults on the
  top-K weights, weight-gradient mults on the kept activations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Sequence, Tuple, Union

import sympy

from sas_compile.runtime.projection import check_M
from sas_compile.runtime.swat import topk_count

Size = Union[int, sympy.Expr]

__all__ = [
    "Geometry",
    "COST_FORMULAS",
    "register_cost",
    "layer_cost",
    "round_half_up",
    "sws_width",
    "SWSLayerShape",
    "sws_layer_shape",
    "conv_output_size",
    "conv_output_shape",
    "output_positions",
    "fan_in",
    "weight_numel",
    "format_count",
    "check_M_values",
    "LAYER_OPS",
]

METHODS = ("base", "sas", "sws", "swat")
LAYER_OPS = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


@dataclass(frozen=True)
class Geometry:
    """A conv/linear layer as the formulas see it (``LayerPlan`` has the same fields)."""

    op: str
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...] = ()
    groups: int = 1
    has_bias: bool = False


def fan_in(layer) -> int:
    """``Cbar``: mults per output position and output channel, ``Cin/groups * prod(kernel)``."""
    n = layer.in_channels // max(int(layer.groups), 1)
    for k in layer.kernel_size or ():
        n *= int(k)
    return n


def weight_numel(layer) -> int:
    return int(layer.out_channels) * fan_in(layer)


# ---------------------------------------------------------------------------- widths


def round_half_up(x: float) -> int:
    """Round to the nearest int, halves up.

    Python's ``round`` is banker's rounding (``round(2.5) == 2``); the paper's widths use
    ordinary rounding, so we use ``floor(x + 0.5)``.
    """
    return int(math.floor(x + 0.5))


def sws_width(channels: int, M: int) -> int:
    """SWS width of a hidden tensor with ``channels`` channels: ``round(sqrt(M) * channels)``."""
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels={channels!r} must be a positive int")
    return round_half_up(math.sqrt(M) * channels)


class SWSLayerShape(NamedTuple):
    """Widths of one SWS conv/linear: channels in and out, groups, and weights per output."""

    in_channels: int
    out_channels: int
    groups: int
    fan_in: int  # in_channels / groups * kernel: the row length of the 1:M weight


def sws_layer_shape(
    in_channels: int,
    out_channels: int,
    M: int,
    *,
    groups: int = 1,
    kernel: int = 1,
    widen_in: bool = True,
    widen_out: bool = True,
    in_width: Optional[int] = None,
    out_width: Optional[int] = None,
) -> SWSLayerShape:
    """The one SWS rule for a single conv/linear (``kernel`` = product of its kernel sizes).

    Standalone (no ``in_width``/``out_width``), each width widens to ``sws_width(C, M)`` per
    group, ``groups * sws_width(C / groups, M)``, so a grouped conv keeps its group count;
    ``widen_in=False`` / ``widen_out=False`` keep a network input / final output at its size. A
    depthwise conv (``groups == in == out``) stays depthwise: one width ``sws_width(C, M)`` when
    both sides widen, else it stays whole.

    In a whole graph a width is shared by every layer that touches it, so the analysis
    decides it once (``sws_width`` of the tied width group, or the size when it must stay) and
    passes it as ``in_width``/``out_width``; the rule then gives the layer's groups and fan-in:
    a conv with one input channel per group (``groups == in_channels``) keeps that, its groups
    follow the new width. ``fan_in = in / groups * kernel`` either way.
    """
    if (in_width is None) != (out_width is None):
        raise ValueError("sws_layer_shape: give both in_width and out_width, or neither")
    if in_width is not None:
        cin, cout = in_width, out_width
        depthwise = groups > 1 and groups == in_channels
        g = cin if depthwise else groups
    elif groups > 1 and groups == in_channels == out_channels:
        cin = cout = g = sws_width(in_channels, M) if (widen_in and widen_out) else in_channels
    else:
        cin = groups * sws_width(in_channels // groups, M) if widen_in else in_channels
        cout = groups * sws_width(out_channels // groups, M) if widen_out else out_channels
        g = groups
    return SWSLayerShape(cin, cout, g, cin // g * kernel)


def check_M_values(M, what: str = "M") -> Tuple[int, ...]:
    """``M`` as a tuple of distinct ints, each a power of two >= 2 (one clear ValueError otherwise)."""
    if isinstance(M, bool) or not isinstance(M, (int, tuple, list, range)):
        raise ValueError(f"{what}={M!r}: expected a power of two >= 2 or a sequence of them, e.g. {what}=(2, 4, 8)")
    values = (M,) if isinstance(M, int) else tuple(M)
    if not values:
        raise ValueError(f"{what} is empty: give at least one value, e.g. {what}=(2, 4, 8)")
    out = []
    for value in values:
        value = check_M(value, what=what)
        if value not in out:
            out.append(value)
    return tuple(out)


# ---------------------------------------------------------------------------- positions


def _floordiv(a: Size, b: int) -> Size:
    if isinstance(a, sympy.Basic):
        return sympy.floor(a / b)
    return a // b


def conv_output_size(size: Size, kernel: int, stride: int = 1, padding: Any = 0, dilation: int = 1) -> Size:
    """Output length of one conv dimension (PyTorch's formula), on ints or sympy expressions.

    ``floor((size + 2*padding - dilation*(kernel - 1) - 1) / stride) + 1``; ``padding`` may be
    an int, ``"valid"`` (0) or ``"same"`` (output = input, stride 1 only, as in PyTorch).
    """
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif padding == "same":
            if stride != 1:
                raise ValueError("padding='same' needs stride=1 (PyTorch rejects it otherwise)")
            return size
        else:
            raise ValueError(f"padding={padding!r}: use an int, a pair, 'same' or 'valid'")
    out = _floordiv(size + 2 * padding - dilation * (kernel - 1) - 1, stride) + 1
    if not isinstance(out, sympy.Basic) and out < 1:
        raise ValueError(
            f"conv input size {size} is too small for kernel {kernel}, stride {stride}, "
            f"padding {padding}, dilation {dilation} (output size {out})"
        )
    return out


def _per_dim(value: Any, n: int, what: str) -> Tuple[Any, ...]:
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return tuple(value) * n
        if len(value) != n:
            raise ValueError(f"{what}={value!r}: a {n}-d convolution needs one value or {n}")
        return tuple(value)
    return (value,) * n


def conv_output_shape(spatial: Sequence[Size], kernel_size: Any, stride: Any = 1, padding: Any = 0,
                      dilation: Any = 1) -> Tuple[Size, ...]:
    """Output spatial sizes of a conv with ``len(spatial)`` spatial dims (ints or sympy)."""
    n = len(spatial)
    ks, ss, ds = (_per_dim(v, n, w) for v, w in ((kernel_size, "kernel_size"), (stride, "stride"),
                                                 (dilation, "dilation")))
    ps = (padding,) * n if isinstance(padding, str) else _per_dim(padding, n, "padding")
    return tuple(conv_output_size(s, k, st, p, d) for s, k, st, p, d in zip(spatial, ks, ss, ps, ds))


def output_positions(op: str, output_shape: Optional[Sequence[Size]], input_shape: Optional[Sequence[Size]] = None,
                     spatial_dims: Optional[int] = None) -> Optional[Size]:
    """Output positions of a layer (every output dim but the channel one), or None if unknown.

    Linear: all leading dims. Convolution: batch and spatial dims of the output (an unbatched
    input has one dim fewer than ``spatial_dims + 2``; ``spatial_dims`` defaults to the op's:
    1 for conv1d, 2 for conv2d). A transposed convolution multiplies per *input* position.
    """
    transposed = "transpose" in op
    shape = input_shape if transposed else output_shape
    if shape is None:
        return None
    dims = list(shape)
    if spatial_dims is None:
        spatial_dims = {"conv1d": 1, "conv2d": 2, "conv3d": 3}.get(op.replace("_transpose", ""))
    if op == "linear":
        dims = dims[:-1]
    elif spatial_dims is not None and len(dims) == spatial_dims + 1:
        dims = dims[1:]  # unbatched: channels first
    else:
        dims = dims[:1] + dims[2:]
    n: Size = 1
    for d in dims:
        n = n * d
    return n


# ---------------------------------------------------------------------------- the registry

Formula = Callable[..., Dict[str, Size]]
COST_FORMULAS: Dict[Tuple[str, str], Formula] = {}


def register_cost(ops: Iterable[str], method: str) -> Callable[[Formula], Formula]:
    """Register ``fn(layer, *, positions, **method_args) -> {count: value}`` for ``(op, method)``."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")

    def register(fn: Formula) -> Formula:
        for op in ops:
            COST_FORMULAS[(op, method)] = fn
        return fn

    return register


def layer_cost(layer, method: str, *, positions: Size = 1, **kwargs) -> Dict[str, Size]:
    """The counts of ``layer`` under ``method`` for ``positions`` output positions."""
    try:
        formula = COST_FORMULAS[(layer.op, method)]
    except KeyError:
        raise ValueError(f"no {method} cost formula for op {layer.op!r} (registered: "
                         f"{sorted(op for op, m in COST_FORMULAS if m == method)})") from None
    return formula(layer, positions=positions, **kwargs)


def _bias(layer, out_channels: Optional[int] = None) -> int:
    return int(out_channels if out_channels is not None else layer.out_channels) if layer.has_bias else 0


@register_cost(LAYER_OPS, "base")
def _base(layer, *, positions: Size = 1, sws_M: Optional[int] = None) -> Dict[str, Size]:
    """Dense layer: ``Co * Cbar`` per output position; a layer carrying a 1:M mask counts its nonzeros."""
    numel = weight_numel(layer)
    per_position = -(-numel // sws_M) if sws_M else numel
    return {"mults": positions * per_position, "params": numel + _bias(layer)}


@register_cost(LAYER_OPS, "sas")
def _sas(layer, *, positions: Size = 1, M: int) -> Dict[str, Size]:
    """SAS at M: the narrow layer's mults, an M-times wider weight."""
    numel = weight_numel(layer)
    return {"mults": positions * numel, "params": M * numel + _bias(layer)}


@register_cost(LAYER_OPS, "sws")
def _sws(layer, *, positions: Size = 1, M: int, in_channels: Optional[int] = None,
         out_channels: Optional[int] = None, groups: Optional[int] = None, sparse: bool = True,
         widen_in: bool = True, widen_out: bool = True) -> Dict[str, Size]:
    """SWS at M with a 1:M sparse weight at the given widths (the standalone rule without them).

    ``mults`` per output position are ``ceil(fan_in * Co / M)``; ``params`` the stored dense
    weight (+ bias), ``nonzero_params`` the kept weights (+ bias). ``sparse=False`` is a layer
    whose weight SWS keeps dense. ``in_channels``/``out_channels`` are the widened widths,
    ``fan_in`` the widened per-output fan-in.
    """
    if in_channels is None or out_channels is None:
        in_channels, out_channels, groups, _ = sws_layer_shape(
            layer.in_channels, layer.out_channels, M, groups=int(layer.groups), widen_in=widen_in, widen_out=widen_out)
    groups = int(layer.groups) if groups is None else int(groups)
    wide = Geometry(layer.op, int(in_channels), int(out_channels), tuple(layer.kernel_size or ()), groups,
                    layer.has_bias)
    numel = weight_numel(wide)
    nnz = -(-numel // M) if sparse else numel
    b = _bias(wide)
    return {"mults": positions * nnz, "params": numel + b, "nonzero_params": nnz + b,
            "in_channels": int(in_channels), "out_channels": int(out_channels), "fan_in": fan_in(wide)}


@register_cost(LAYER_OPS, "swat")
def _swat(layer, *, positions: Size = 1, weight_density: float, activation_density: float,
          structure: str = "unstructured") -> Dict[str, Size]:
    """SWAT training mults: forward and input gradient on the top-K weights (per structure),
    weight gradient on the kept activation fraction of the dense ``Co * Cbar`` per position."""
    numel = weight_numel(layer)
    if structure == "channel":
        # the input channels one weight slice ranks: in/groups of a convolution's [out, in/groups, *k]
        # weight, all the input channels of a transposed one's [in, out/groups, *k]
        transposed = layer.op.startswith("conv_transpose")
        channels = layer.in_channels if transposed else layer.in_channels // max(int(layer.groups), 1)
        nonzeros = numel * topk_count(weight_density, channels) // channels
    else:
        nonzeros = topk_count(weight_density, numel)
    return {"forward_mults": nonzeros * positions, "backward_input_mults": nonzeros * positions,
            "backward_weight_mults": int(round(activation_density * numel * positions))}


# ---------------------------------------------------------------------------- display


def format_count(n: int, exact: bool = False) -> str:
    """``1814073344`` -> ``1.81G`` (or ``1,814,073,344`` when exact)."""
    n = int(n)
    if exact:
        return f"{n:,}"
    for unit, scale in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            value = n / scale
            digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
            return f"{value:.{digits}f}{unit}"
    return str(n)
