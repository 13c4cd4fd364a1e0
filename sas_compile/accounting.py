"""Per-op mult and parameter formulas for base, SAS and SWS layers.

One table of formulas, used by every consumer (``report``, ``inspect``, the CLI, the
benchmarks): nothing else in the project counts multiplications. The paper's "mult count"
is multiply-accumulates of conv/linear layers (not 2x FLOPs); params are stored weights and
biases. Every size argument may be an int or a sympy expression, so the same code gives
exact numbers for one input and formulas in the input sizes.

- Base: ``Co * Cbar`` mults per output position, ``Cbar = Cin/groups * kh * kw``.
- SAS at M: mults equal base (one of every M projected activations is nonzero); params
  ``M * weight + bias``.
- SWS at M: widths ``round(sqrt(M) * C)`` (round half up), weights 1:M sparse; mults per
  output position ``ceil(in * out / M)`` (the paper counts a last partial chunk as one
  nonzero); params reported both as stored dense and as nonzeros.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import sympy

from .passes.costs import round_half_up, sws_layer_shape, sws_width

Size = Union[int, sympy.Expr]

__all__ = [
    "round_half_up",
    "sws_width",
    "check_M_values",
    "conv_output_size",
    "conv2d_output_hw",
    "linear_positions",
    "output_positions",
    "base_costs",
    "sas_costs",
    "sws_costs",
    "linear_costs",
    "conv2d_costs",
    "layer_costs",
    "sum_costs",
]


def check_M_values(M: Union[int, Iterable[int]]) -> Tuple[int, ...]:
    """Return ``M`` as a tuple of distinct ints, each a power of two >= 2 (clear error otherwise)."""
    from sas_compile.runtime.projection import check_M

    values = (M,) if isinstance(M, int) else tuple(M)
    if not values:
        raise ValueError("M is empty: give at least one value, e.g. M=(2, 4, 8)")
    out = []
    for value in values:
        value = check_M(value)
        if value not in out:
            out.append(value)
    return tuple(out)


def _check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}={value!r} must be a positive int")
    return value


def _pair(value: Any, what: str) -> Tuple[Any, Any]:
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            return value[0], value[0]
        if len(value) != 2:
            raise ValueError(f"{what}={value!r}: a conv2d needs one value or two (h, w)")
        return value[0], value[1]
    return value, value


def _floordiv(a: Size, b: int) -> Size:
    if isinstance(a, sympy.Basic):
        return sympy.floor(a / b)
    return a // b


def conv_output_size(
    size: Size, kernel: int, stride: int = 1, padding: Any = 0, dilation: int = 1
) -> Size:
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


def conv2d_output_hw(
    height: Size, width: Size, kernel_size: Any, stride: Any = 1, padding: Any = 0, dilation: Any = 1
) -> Tuple[Size, Size]:
    """(H_out, W_out) of a conv2d; every argument may be an int or an (h, w) pair."""
    kh, kw = _pair(kernel_size, "kernel_size")
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    if isinstance(padding, str):
        ph = pw = padding
    else:
        ph, pw = _pair(padding, "padding")
    return (
        conv_output_size(height, kh, sh, ph, dh),
        conv_output_size(width, kw, sw, pw, dw),
    )


def linear_positions(input_shape: Sequence[Size]) -> Size:
    """Output positions of a linear layer: the product of all leading dims of its input."""
    n: Size = 1
    for d in list(input_shape)[:-1]:
        n = n * d
    return n


def output_positions(
    op: str, output_shape: Optional[Sequence[Size]], input_shape: Optional[Sequence[Size]] = None,
    spatial_dims: Optional[int] = None,
) -> Optional[Size]:
    """Output positions of a layer (ints or sympy): every dim but the channel one.

    Linear: all leading dims. Convolution: batch and spatial dims of the output (an unbatched
    input has one dim fewer than ``spatial_dims + 2``). A transposed convolution multiplies
    per *input* position, so its positions come from ``input_shape``. None if unknown.
    """
    transposed = "transpose" in op
    shape = input_shape if transposed else output_shape
    if shape is None:
        return None
    dims = list(shape)
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


def base_costs(weight_numel: int, out_channels: int, bias: bool, positions: Size = 1) -> Dict[str, Size]:
    """Dense layer: ``weight_numel`` mults per output position; weight plus bias params."""
    return {"mults": positions * weight_numel, "params": weight_numel + (out_channels if bias else 0)}


def sas_costs(weight_numel: int, out_channels: int, bias: bool, M: int, positions: Size = 1) -> Dict[str, Size]:
    """SAS layer at M: mults equal base, the weight is M times wider."""
    return {"mults": positions * weight_numel, "params": M * weight_numel + (out_channels if bias else 0)}


def sws_costs(
    in_features: int,
    out_features: int,
    bias: bool,
    M: int,
    positions: Size = 1,
    *,
    in_channels: Optional[int] = None,
    out_channels: Optional[int] = None,
    sparse: bool = True,
) -> Dict[str, Size]:
    """SWS layer at M with a 1:M sparse ``out_features x in_features`` weight.

    Mults per output position are ``ceil(in*out/M)`` (a last partial chunk counts as one
    nonzero); ``params`` is the dense stored weight (+ bias), ``nonzero_params`` the kept
    weights (+ bias). ``in_features``/``out_features`` in the result are the layer's widened
    channel widths (``in_channels``/``out_channels`` when given, else the fan-in/fan-out).
    ``sparse=False`` is a layer SWS leaves dense (neither width widened): all weights count.
    """
    nnz = -(-(in_features * out_features) // M) if sparse else in_features * out_features
    b = out_features if bias else 0
    return {
        "mults": positions * nnz,
        "params": in_features * out_features + b,
        "nonzero_params": nnz + b,
        "in_features": in_features if in_channels is None else in_channels,
        "out_features": out_features if out_channels is None else out_channels,
    }


def _row(
    name: str,
    op: str,
    base: Dict[str, Size],
    sas: Dict[int, Dict[str, Size]],
    sws: Dict[int, Dict[str, Size]],
    eligible: bool = True,
    reason: Optional[str] = None,
) -> Dict[str, Any]:
    """A report row with exact ints; ``symbolic.base_mults`` keeps the (maybe sympy) formula."""
    symbolic = str(sympy.sympify(base["mults"]))
    return {
        "name": name,
        "op": op,
        "eligible": bool(eligible),
        "reason": reason,
        "base": _as_ints(base),
        "sas": {m: _as_ints(c) for m, c in sas.items()},
        "sws": {m: _as_ints(c) for m, c in sws.items()},
        "symbolic": {"base_mults": symbolic},
    }


def _as_ints(costs: Dict[str, Size]) -> Dict[str, Any]:
    out = {}
    for key, value in costs.items():
        if isinstance(value, sympy.Basic):
            if not value.is_number:
                # a symbolic count stays a formula; numbers come from substituting sizes
                out[key] = value
                continue
            value = int(value)
        out[key] = int(value)
    return out


def linear_costs(
    in_features: int,
    out_features: int,
    M: Union[int, Iterable[int]] = (2, 4, 8),
    *,
    bias: bool = False,
    positions: Size = 1,
    widen_in: bool = True,
    widen_out: bool = True,
    name: str = "linear",
) -> Dict[str, Any]:
    """Base/SAS/SWS costs of one linear layer, as a report row (same dict as ``Report.to_dict()``).

    ``positions`` is the number of output positions (product of the input's leading dims;
    1 gives the paper's per-position count). ``bias`` defaults to False because the paper
    counts weights. ``widen_in=False`` / ``widen_out=False`` keep a network input / final
    output at its size in SWS. ``linear_costs(288, 64, 8)`` is the paper's example: base
    18432 mults, SAS 18432 mults and 147456 weights, SWS 815 x 181 and 18440 mults.
    """
    _check_positive_int(in_features, "in_features")
    _check_positive_int(out_features, "out_features")
    Ms = check_M_values(M)
    weight = in_features * out_features
    base = base_costs(weight, out_features, bias, positions)
    sas = {m: sas_costs(weight, out_features, bias, m, positions) for m in Ms}
    sws = {}
    for m in Ms:
        fin = sws_width(in_features, m) if widen_in else in_features
        fout = sws_width(out_features, m) if widen_out else out_features
        sws[m] = sws_costs(fin, fout, bias, m, positions)
    return _row(name, "linear", base, sas, sws)


def conv2d_costs(
    in_channels: int,
    out_channels: int,
    kernel_size: Any,
    M: Union[int, Iterable[int]] = (2, 4, 8),
    *,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    bias: bool = False,
    input_hw: Optional[Tuple[Size, Size]] = None,
    batch: Size = 1,
    widen_in: bool = True,
    widen_out: bool = True,
    name: str = "conv2d",
) -> Dict[str, Any]:
    """Base/SAS/SWS costs of one conv2d, as a report row.

    Without ``input_hw`` the counts are per output position (the paper's "for a single
    pixel"); with it they are for ``batch`` images of that size, output size derived through
    stride, padding ('same'/'valid' too) and dilation. SWS widens channels
    (``round(sqrt(M) * Cin)``), so its fan-in is that times ``kh * kw``.
    """
    _check_positive_int(in_channels, "in_channels")
    _check_positive_int(out_channels, "out_channels")
    _check_positive_int(groups, "groups")
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}"
        )
    Ms = check_M_values(M)
    kh, kw = _pair(kernel_size, "kernel_size")
    positions: Size = 1
    if input_hw is not None:
        ho, wo = conv2d_output_hw(input_hw[0], input_hw[1], (kh, kw), stride, padding, dilation)
        positions = batch * ho * wo
    cbar = in_channels // groups * kh * kw
    weight = out_channels * cbar
    base = base_costs(weight, out_channels, bias, positions)
    sas = {m: sas_costs(weight, out_channels, bias, m, positions) for m in Ms}
    sws = {}
    for m in Ms:
        shape = sws_layer_shape(in_channels, out_channels, m, groups=groups, kernel=kh * kw, widen_in=widen_in,
                                widen_out=widen_out)
        sws[m] = sws_costs(shape.fan_in, shape.out_channels, bias, m, positions, in_channels=shape.in_channels,
                           out_channels=shape.out_channels)
    return _row(name, "conv2d", base, sas, sws)


def layer_costs(
    layer: Any,
    M: Union[int, Iterable[int]],
    *,
    positions: Size = 1,
    sws_widths: Optional[Dict[int, Any]] = None,
    eligible_at: Optional[Dict[int, bool]] = None,
) -> Dict[str, Any]:
    """Costs of one ``LayerPlan`` as a report row; the plan's eligibility is taken as given.

    ``sws_widths`` maps M to the whole-graph SWS widths of this layer (an object with
    ``in_channels``, ``out_channels``, ``in_features``, ``out_features`` and ``sparse``, whether
    SWS masks its weight 1:M; ``widened`` stands in for it when absent); without it the standalone rule is used. ``eligible_at`` maps M to the plan's eligibility at that M (a
    layer that stays dense at M counts as base in the SAS column). A layer that is already
    SAS (``extra['sas_M']``) reports its real wide parameters; a layer that is already SWS
    (``extra['sws_M']``, a 1:M masked weight) costs its nonzeros in the base and SWS columns.
    """
    Ms = check_M_values(M)
    weight = layer.weight_numel
    co = layer.out_channels
    base = base_costs(weight, co, layer.has_bias, positions)
    already = layer.extra.get("sas_M") if layer.extra else None
    sas = {}
    for m in Ms:
        ok = layer.eligible if eligible_at is None else eligible_at.get(m, layer.eligible)
        if already:
            sas[m] = sas_costs(weight, co, layer.has_bias, int(already), positions)
        elif ok:
            sas[m] = sas_costs(weight, co, layer.has_bias, m, positions)
        else:
            sas[m] = dict(base)
    sws = {}
    kernel = 1
    for k in layer.kernel_size or ():
        kernel *= k
    masked = layer.extra.get("sws_M") if layer.extra else None
    if masked:
        # already an SWS layer (1:M mask): it costs its nonzeros, at any M, at its own widths
        real = sws_costs(weight // co, co, layer.has_bias, int(masked), positions,
                         in_channels=layer.in_channels, out_channels=co)
        base = {"mults": real["mults"], "params": real["params"]}
        return _row(layer.name, layer.op, base, sas, {m: dict(real) for m in Ms}, layer.eligible, layer.reason)
    for m in Ms:
        w = (sws_widths or {}).get(m)
        if w is not None:
            sws[m] = sws_costs(
                w.in_features, w.out_features, layer.has_bias, m, positions,
                in_channels=w.in_channels, out_channels=w.out_channels, sparse=bool(getattr(w, "sparse", getattr(w, "widened", True))),
            )
            continue
        widen_in = not layer.input_is_graph_input
        if layer.op == "conv2d":
            shape = sws_layer_shape(layer.in_channels, co, m, groups=layer.groups, kernel=kernel, widen_in=widen_in)
            sws[m] = sws_costs(shape.fan_in, shape.out_channels, layer.has_bias, m, positions,
                               in_channels=shape.in_channels, out_channels=shape.out_channels)
        else:
            fin = sws_width(layer.in_channels, m) if widen_in else layer.in_channels
            sws[m] = sws_costs(fin, sws_width(co, m), layer.has_bias, m, positions)
    return _row(layer.name, layer.op, base, sas, sws, layer.eligible, layer.reason)


def sum_costs(rows: Sequence[Dict[str, Any]], M: Sequence[int]) -> Dict[str, Any]:
    """Totals of report rows: ``{"base": {...}, "sas": {M: {...}}, "sws": {M: {...}}}``."""

    def add(dicts, keys):
        return {k: sum(int(d[k]) for d in dicts) for k in keys}

    return {
        "base": add([r["base"] for r in rows], ("mults", "params")),
        "sas": {m: add([r["sas"][m] for r in rows], ("mults", "params")) for m in M},
        "sws": {m: add([r["sws"][m] for r in rows], ("mults", "params", "nonzero_params")) for m in M},
    }
