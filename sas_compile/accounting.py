"""Mult and parameter counts of single layers for base, SAS and SWS: the user's accounting.

Every number comes from the cost registry of ``passes/costs.py`` (the one table of
formulas, shared with ``report`` and ``inspect_model``); this module shapes them into report
rows: ``{"name", "op", "eligible", "reason", "base", "sas": {M: ...}, "sws": {M: ...},
"symbolic"}``. :func:`layer_costs` is the one row builder (``report`` counts every layer of
a model with it); :func:`linear_costs` and :func:`conv2d_costs` count a layer described by
its sizes, as in the paper's worked example::

    linear_costs(288, 64, 8)   # base 18432 mults; SAS 18432 mults, 147456 weights;
                               # SWS 815 x 181, 18440 mults

The paper's "mult count" is multiply-accumulates of conv/linear layers (not 2x FLOPs); params
are stored weights and biases. SWS widths are ``round(sqrt(M) * C)`` (round half up) and its
weights 1:M sparse: ``ceil(fan_in * out / M)`` mults per output position.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import sympy

from .passes import costs
from .passes.costs import (
    check_M_values,
    conv_output_shape,
    conv_output_size,
    output_positions,
    round_half_up,
    sws_width,
)
from .passes.plan import LayerPlan

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


def conv2d_output_hw(height: Size, width: Size, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                     dilation: Any = 1) -> Tuple[Size, Size]:
    """(H_out, W_out) of a conv2d; every argument may be an int or an (h, w) pair."""
    for value, what in ((kernel_size, "kernel_size"), (stride, "stride"), (dilation, "dilation")):
        _pair(value, what)
    if not isinstance(padding, str):
        _pair(padding, "padding")
    h, w = conv_output_shape((height, width), kernel_size, stride, padding, dilation)
    return h, w


def linear_positions(input_shape: Sequence[Size]) -> Size:
    """Output positions of a linear layer: the product of all leading dims of its input."""
    n: Size = 1
    for d in list(input_shape)[:-1]:
        n = n * d
    return n


def _linear(fan_in: int, out_features: int, bias: bool) -> costs.Geometry:
    return costs.Geometry("linear", int(fan_in), int(out_features), (), 1, bool(bias))


def base_costs(weight_numel: int, out_channels: int, bias: bool, positions: Size = 1) -> Dict[str, Size]:
    """Dense layer: ``weight_numel`` mults per output position; weight plus bias params."""
    return costs.layer_cost(_linear(weight_numel // max(out_channels, 1), out_channels, bias), "base",
                            positions=positions)


def sas_costs(weight_numel: int, out_channels: int, bias: bool, M: int, positions: Size = 1) -> Dict[str, Size]:
    """SAS layer at M: mults equal base, the weight is M times wider."""
    return costs.layer_cost(_linear(weight_numel // max(out_channels, 1), out_channels, bias), "sas",
                            positions=positions, M=M)


def sws_costs(in_features: int, out_features: int, bias: bool, M: int, positions: Size = 1, *,
              in_channels: Optional[int] = None, out_channels: Optional[int] = None,
              sparse: bool = True) -> Dict[str, Size]:
    """SWS layer at M with a 1:M sparse ``out_features x in_features`` weight (``in_features``: fan-in).

    Mults per output position are ``ceil(in*out/M)`` (a last partial chunk counts as one
    nonzero); ``params`` is the dense stored weight (+ bias), ``nonzero_params`` the kept
    weights (+ bias). ``in_features``/``out_features`` in the result are the layer's widened
    channel widths (``in_channels``/``out_channels`` when given, else the fan-in/fan-out).
    ``sparse=False`` is a layer SWS leaves dense: all weights count.
    """
    c = costs.layer_cost(_linear(in_features, out_features, bias), "sws", positions=positions, M=M,
                         in_channels=in_features, out_channels=out_features, sparse=sparse)
    return {"mults": c["mults"], "params": c["params"], "nonzero_params": c["nonzero_params"],
            "in_features": in_features if in_channels is None else in_channels,
            "out_features": out_features if out_channels is None else out_channels}


def _ints(counts: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for key, value in counts.items():
        if isinstance(value, sympy.Basic) and not value.is_number:
            out[key] = value  # a symbolic count stays a formula; numbers come from substituting sizes
        else:
            out[key] = int(value)
    return out


def layer_costs(
    layer: Any,
    M: Union[int, Iterable[int]],
    *,
    positions: Size = 1,
    sws_widths: Optional[Dict[int, Any]] = None,
    eligible_at: Optional[Dict[int, bool]] = None,
    sws_dense: bool = False,
    widen_out: bool = True,
) -> Dict[str, Any]:
    """The report row of one layer (a ``LayerPlan``) at every M, counted by ``passes/costs.py``.

    ``sws_widths`` maps M to the layer's whole-graph SWS widths (an object with
    ``in_channels``, ``out_channels``, ``groups`` and ``sparse``, whether SWS masks the weight
    1:M; ``widened`` stands in for ``sparse`` when absent); without them the one-layer rule is
    used (the input width stays when the layer reads the raw network input; ``widen_out=False``
    keeps the output width). ``eligible_at`` maps M to the eligibility at that M (a layer dense
    at M counts as base in the SAS column); the plan's eligibility otherwise. A layer that is
    already SAS (``sas_M``) reports its real wide parameters; a layer carrying a 1:M SWS mask
    (``sws_M``) costs its nonzeros in the base and SWS columns; ``sws_dense`` counts a layer SWS
    keeps as it is (an unmasked layer of a model swsify built).
    """
    Ms = check_M_values(M)
    base = costs.layer_cost(layer, "base", positions=positions)
    sas, sws = {}, {}
    for m in Ms:
        ok = layer.eligible if eligible_at is None else eligible_at.get(m, layer.eligible)
        if layer.sas_M:
            sas[m] = costs.layer_cost(layer, "sas", positions=positions, M=int(layer.sas_M))
        elif ok:
            sas[m] = costs.layer_cost(layer, "sas", positions=positions, M=m)
        else:
            sas[m] = dict(base)
    own = dict(in_channels=layer.in_channels, out_channels=layer.out_channels, groups=layer.groups)
    if layer.sws_M:
        real = costs.layer_cost(layer, "sws", positions=positions, M=int(layer.sws_M), **own)
        base = {"mults": real["mults"], "params": real["params"]}
        sws = {m: real for m in Ms}
    else:
        for m in Ms:
            w = (sws_widths or {}).get(m)
            if sws_dense:  # SWS keeps it as it is
                sws[m] = costs.layer_cost(layer, "sws", positions=positions, M=m, sparse=False, **own)
            elif w is not None:
                sparse = bool(getattr(w, "sparse", getattr(w, "widened", True)))
                sws[m] = costs.layer_cost(layer, "sws", positions=positions, M=m, in_channels=w.in_channels,
                                          out_channels=w.out_channels, groups=w.groups, sparse=sparse)
            else:
                sws[m] = costs.layer_cost(layer, "sws", positions=positions, M=m,
                                          widen_in=not layer.input_is_graph_input, widen_out=widen_out)
    return {
        "name": layer.name,
        "op": layer.op,
        "eligible": bool(layer.eligible),
        "reason": layer.reason,
        "base": _ints(base),
        "sas": {m: _ints({"mults": c["mults"], "params": c["params"]}) for m, c in sas.items()},
        "sws": {m: _ints({"mults": c["mults"], "params": c["params"], "nonzero_params": c["nonzero_params"],
                          "in_features": c["in_channels"], "out_features": c["out_channels"]})
                for m, c in sws.items()},
        "symbolic": {"base_mults": str(sympy.sympify(base["mults"]))},
    }


def linear_costs(in_features: int, out_features: int, M: Union[int, Iterable[int]] = (2, 4, 8), *,
                 bias: bool = False, positions: Size = 1, widen_in: bool = True, widen_out: bool = True,
                 name: str = "linear") -> Dict[str, Any]:
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
    layer = LayerPlan(name, name, "linear", True, None, in_features, out_features, has_bias=bias,
                      input_is_graph_input=not widen_in)
    return layer_costs(layer, Ms, positions=positions, widen_out=widen_out)


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
    layer = LayerPlan(name, name, "conv2d", True, None, in_channels, out_channels, (kh, kw), groups=groups,
                      has_bias=bias, input_is_graph_input=not widen_in)
    return layer_costs(layer, Ms, positions=positions, widen_out=widen_out)


def sum_costs(rows: Sequence[Dict[str, Any]], M: Sequence[int]) -> Dict[str, Any]:
    """Totals of report rows: ``{"base": {...}, "sas": {M: {...}}, "sws": {M: {...}}}``."""

    def add(dicts, keys):
        return {k: sum(int(d[k]) for d in dicts) for k in keys}

    return {
        "base": add([r["base"] for r in rows], ("mults", "params")),
        "sas": {m: add([r["sas"][m] for r in rows], ("mults", "params")) for m in M},
        "sws": {m: add([r["sws"][m] for r in rows], ("mults", "params", "nonzero_params")) for m in M},
    }
