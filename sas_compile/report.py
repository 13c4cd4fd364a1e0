"""``sas_compile.report(model)``: exact mult and parameter counts for base, SAS and SWS.

Users decide whether SAS is worth it from these numbers before training anything. The
report reads the per-layer plan of ``sas_compile.api.analyze`` (it never decides
eligibility itself), counts with :mod:`sas_compile.accounting` (the one table of formulas)
and takes SWS widths from the whole-graph SWS analysis, so the three columns agree with
what ``sasify`` and ``swsify`` build. With ``swat=`` it adds SWAT training mults (forward,
backward input gradient, backward weight gradient) per sparsity, counted only by
``sas_compile.swat.swat_costs`` for the layers ``swatify`` would convert.

Without example inputs every count is per output position (the paper's "for a single
pixel"); with them counts are exact for that input, and ``symbolic.base_mults`` gives each
layer's mults as a formula in the input sizes (``batch``, ``height``, ``width``, ``seq``...).
"""
from __future__ import annotations

import copy
import csv
import io
import json
import logging
import sys
import types
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import sympy
import torch
from torch import nn

from . import accounting
from .plan import LayerPlan, Plan
from .runtime.sws_mask import sws_mask_of

log = logging.getLogger("sas_compile.report")

__all__ = ["Report", "report", "format_count"]


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


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}x" if b else "-"


SWAT_KEYS = ("forward_mults", "backward_input_mults", "backward_weight_mults")


def _training(costs: Dict[str, int]) -> int:
    """Training mults of one step: forward plus both backward products."""
    return sum(int(costs[k]) for k in SWAT_KEYS)


def _sum_swat(rows: Sequence[Dict[str, Any]], sparsities: Sequence[float]) -> Dict[str, Any]:
    """``{"swat": {s: {...}}, "swat_dense": {...}}`` summed over rows, each with ``training_mults``."""

    def add(dicts):
        out = {k: sum(int(d[k]) for d in dicts) for k in SWAT_KEYS}
        out["training_mults"] = _training(out)
        return out

    return {"swat": {s: add([r["swat"][s] for r in rows]) for s in sparsities},
            "swat_dense": add([r["swat_dense"] for r in rows])}


def _sparsity_label(s: float) -> str:
    return f"{s:g}"


class Report:
    """Per-layer and total mults/params of a model for base, SAS and SWS at several M.

    ``print(report)`` shows a table nested by module path; :meth:`to_dict` has a fixed
    schema (int M keys); :meth:`to_markdown`, :meth:`to_csv` and :meth:`to_json` export it.
    ``plans`` holds the analysis plan used for each M, ``symbols`` the example value of
    each size symbol, ``per_position`` is True when no example inputs were given.
    ``swat`` holds the SWAT sparsities (float keys of each row's ``"swat"``), empty when
    the report has no SWAT columns; rows then carry no SWAT keys at all.
    """

    def __init__(
        self,
        layers: List[Dict[str, Any]],
        M: Tuple[int, ...],
        *,
        per_position: bool,
        input_shapes: Optional[List[Tuple[int, ...]]] = None,
        symbols: Optional[Dict[str, int]] = None,
        symbolic_total: Optional[str] = None,
        plans: Optional[Dict[int, Plan]] = None,
        notes: Optional[List[str]] = None,
        swat: Sequence[float] = (),
    ):
        self.layers = layers
        self.M = tuple(M)
        self.per_position = per_position
        self.input_shapes = input_shapes
        self.symbols = dict(symbols or {})
        self.symbolic_total = symbolic_total
        self.plans = plans or {}
        self.notes = list(notes or [])
        self.swat = tuple(float(s) for s in swat)
        self.totals = accounting.sum_costs(layers, self.M)
        if self.swat:
            self.totals.update(_sum_swat(layers, self.swat))

    # --- machine-readable -------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """``{"layers": [...], "totals": {...}}`` with the schema of issue 6 (M keys are ints).

        With SWAT columns each row also has ``"swat": {sparsity: {"forward_mults",
        "backward_input_mults", "backward_weight_mults"}}`` (float keys) and ``"swat_dense"``
        (the same counts for dense training); totals have both, each with ``training_mults``.
        """
        return {"layers": copy.deepcopy(self.layers), "totals": copy.deepcopy(self.totals)}

    def to_json(self, indent: Optional[int] = 2) -> str:
        """The :meth:`to_dict` content as JSON (JSON object keys are strings: M becomes "2")."""
        return json.dumps(self.to_dict(), indent=indent)

    def csv_header(self) -> List[str]:
        cols = ["name", "op", "eligible", "reason", "base_mults", "base_params"]
        for m in self.M:
            cols += [f"sas_M{m}_mults", f"sas_M{m}_params"]
        for m in self.M:
            cols += [f"sws_M{m}_{k}" for k in ("mults", "params", "nonzero_params", "in_features", "out_features")]
        if self.swat:
            cols += [f"swat_dense_{k}" for k in SWAT_KEYS]
            for s in self.swat:
                cols += [f"swat_{_sparsity_label(s)}_{k}" for k in SWAT_KEYS]
        return cols + ["symbolic_base_mults"]

    def to_csv(self) -> str:
        """One line per layer plus a ``total`` line; exact ints; columns from :meth:`csv_header`."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.csv_header())
        for row in self.layers:
            line = [row["name"], row["op"], row["eligible"], row["reason"] or "",
                    row["base"]["mults"], row["base"]["params"]]
            for m in self.M:
                line += [row["sas"][m]["mults"], row["sas"][m]["params"]]
            for m in self.M:
                s = row["sws"][m]
                line += [s["mults"], s["params"], s["nonzero_params"], s["in_features"], s["out_features"]]
            if self.swat:
                line += [row["swat_dense"][k] for k in SWAT_KEYS]
                for s in self.swat:
                    line += [row["swat"][s][k] for k in SWAT_KEYS]
            writer.writerow(line + [row["symbolic"]["base_mults"]])
        t = self.totals
        line = ["total", "", "", "", t["base"]["mults"], t["base"]["params"]]
        for m in self.M:
            line += [t["sas"][m]["mults"], t["sas"][m]["params"]]
        for m in self.M:
            line += [t["sws"][m]["mults"], t["sws"][m]["params"], t["sws"][m]["nonzero_params"], "", ""]
        if self.swat:
            line += [t["swat_dense"][k] for k in SWAT_KEYS]
            for s in self.swat:
                line += [t["swat"][s][k] for k in SWAT_KEYS]
        writer.writerow(line + [self.symbolic_total or ""])
        return buf.getvalue()

    # --- human-readable ---------------------------------------------------------------
    def _tree_rows(self, max_depth: Optional[int]) -> List[Tuple[int, str, List[Dict[str, Any]], bool]]:
        """(depth, name, layer rows below it, is_leaf) in first-appearance order, fvcore style."""
        tree: "OrderedDict[str, Any]" = OrderedDict()
        for row in self.layers:
            node = tree
            parts = row["name"].split(".")
            for i in range(1, len(parts) + 1):
                key = ".".join(parts[:i])
                node = node.setdefault(key, OrderedDict())
            node.setdefault("__rows__", []).append(row)

        out = []

        def below(node) -> List[Dict[str, Any]]:
            rows = list(node.get("__rows__", []))
            for k, child in node.items():
                if k != "__rows__":
                    rows += below(child)
            return rows

        def walk(node, depth):
            for key, child in node.items():
                if key == "__rows__":
                    continue
                rows = below(child)
                own = child.get("__rows__", [])
                children = [k for k in child if k != "__rows__"]
                if own and not children:
                    for r in own:
                        out.append((depth, key, [r], True))
                    continue
                if len(rows) > 1 and (max_depth is None or depth < max_depth):
                    out.append((depth, key, rows, False))
                    for r in own:
                        out.append((depth + 1, key, [r], True))
                    walk(child, depth + 1)
                elif max_depth is not None and depth >= max_depth and len(rows) > 1:
                    out.append((depth, key, rows, False))
                else:
                    # a single layer below: show it once, at this depth
                    out.append((depth, rows[0]["name"], rows, True))

        walk(tree, 0)
        return out

    def table(self, tablefmt: str = "simple", *, exact: bool = False, max_depth: Optional[int] = None) -> str:
        """The report as a tabulate table (module paths nested by indentation), totals and ratios."""
        from tabulate import tabulate

        multiline = tablefmt not in ("github", "pipe", "tsv", "html")
        sep = "\n" if multiline else " "
        fmt = lambda n: format_count(n, exact)  # noqa: E731
        headers = ["module", "op", "SAS", f"base{sep}mults", f"base{sep}params"]
        for m in self.M:
            headers += [f"SAS M={m}{sep}mults", f"SAS M={m}{sep}params",
                        f"SWS M={m}{sep}mults", f"SWS M={m}{sep}params (nnz)", f"SWS M={m}{sep}in x out"]
        if self.swat:
            headers += [f"dense train{sep}mults"]
            for s in self.swat:
                label = f"SWAT s={_sparsity_label(s)}"
                headers += [f"{label}{sep}fwd", f"{label}{sep}bwd-in", f"{label}{sep}bwd-w", f"{label}{sep}train"]
        reasons: "OrderedDict[str, int]" = OrderedDict()
        body = []
        for depth, name, rows, leaf in self._tree_rows(max_depth):
            indent = " " * depth
            tot = accounting.sum_costs(rows, self.M)
            if leaf:
                r = rows[0]
                if r["eligible"]:
                    sas = "yes"
                elif r["reason"]:
                    note = reasons.setdefault(r["reason"], len(reasons) + 1)
                    sas = f"no [{note}]"
                else:
                    sas = "no"
                line = [indent + name, r["op"], sas]
            else:
                line = [indent + name, "", f"{sum(r['eligible'] for r in rows)}/{len(rows)}"]
            line += [fmt(tot["base"]["mults"]), fmt(tot["base"]["params"])]
            for m in self.M:
                s = tot["sws"][m]
                width = ""
                if leaf:
                    w = rows[0]["sws"][m]
                    width = f"{w['in_features']}x{w['out_features']}"
                line += [fmt(tot["sas"][m]["mults"]), fmt(tot["sas"][m]["params"]), fmt(s["mults"]),
                         f"{fmt(s['params'])} ({fmt(s['nonzero_params'])})", width]
            if self.swat:
                line += self._swat_cells(_sum_swat(rows, self.swat), fmt)
            body.append(line)
        t = self.totals
        n_sas = sum(r["eligible"] for r in self.layers)
        total = ["total", "", f"{n_sas}/{len(self.layers)}", fmt(t["base"]["mults"]), fmt(t["base"]["params"])]
        ratio = ["ratio to base", "", "", "1.00x", "1.00x"]
        bm, bp = t["base"]["mults"], t["base"]["params"]
        for m in self.M:
            s = t["sws"][m]
            total += [fmt(t["sas"][m]["mults"]), fmt(t["sas"][m]["params"]), fmt(s["mults"]),
                      f"{fmt(s['params'])} ({fmt(s['nonzero_params'])})", ""]
            ratio += [_ratio(t["sas"][m]["mults"], bm), _ratio(t["sas"][m]["params"], bp), _ratio(s["mults"], bm),
                      f"{_ratio(s['params'], bp)} ({_ratio(s['nonzero_params'], bp)})", ""]
        if self.swat:
            total += self._swat_cells(t, fmt)
            # SWAT columns compare with dense training (swat_costs at density 1), column by column
            dense = t["swat_dense"]
            ratio += ["1.00x"]
            for sp in self.swat:
                c = t["swat"][sp]
                ratio += [_ratio(c[k], dense[k]) for k in SWAT_KEYS]
                ratio += [_ratio(c["training_mults"], dense["training_mults"])]
        body += [total, ratio]
        import inspect as _inspect

        import tabulate as tabulate_module

        # the indentation is the nesting: newer tabulate takes a keyword, 0.9 a module global
        options = {"headers": headers, "tablefmt": tablefmt, "disable_numparse": True}
        if "preserve_whitespace" in _inspect.signature(tabulate).parameters:
            options["preserve_whitespace"] = True
        keep = getattr(tabulate_module, "PRESERVE_WHITESPACE", False)
        tabulate_module.PRESERVE_WHITESPACE = True
        try:
            table = tabulate(body, **options)
        finally:
            tabulate_module.PRESERVE_WHITESPACE = keep
        text = [self._title(), table]
        if reasons:
            text.append("\n".join(f"[{i}] {reason}" for reason, i in reasons.items()))
        if self.symbolic_total:
            text.append(f"total base mults = {self.symbolic_total}"
                        + (f"  (at {', '.join(f'{k}={v}' for k, v in self.symbols.items())})" if self.symbols else ""))
        if self.swat:
            text.append("SWAT columns: training mults (fwd = forward, bwd-in = input gradient, bwd-w = weight "
                        "gradient, train = their sum); their ratios are to dense training (dense train mults)")
        text += self.notes
        return ("\n\n" if not multiline else "\n").join(text)

    def _swat_cells(self, totals: Dict[str, Any], fmt) -> List[str]:
        cells = [fmt(totals["swat_dense"]["training_mults"])]
        for s in self.swat:
            c = totals["swat"][s]
            cells += [fmt(c[k]) for k in SWAT_KEYS] + [fmt(c["training_mults"])]
        return cells

    def _title(self) -> str:
        n_sas = sum(r["eligible"] for r in self.layers)
        if self.per_position:
            scope = "mults per output position (no example inputs)"
        else:
            shapes = ", ".join("x".join(str(d) for d in s) for s in (self.input_shapes or []))
            scope = f"mults for input {shapes}" if shapes else "mults for the example inputs"
        title = (f"sas-compile report: {len(self.layers)} conv/linear layers, {n_sas} converted to SAS; "
                 f"{scope}; M = {', '.join(map(str, self.M))}")
        if self.swat:
            title += f"; SWAT sparsity = {', '.join(map(_sparsity_label, self.swat))}"
        return title

    def to_markdown(self, *, exact: bool = True) -> str:
        """A GitHub-markdown table (exact counts by default)."""
        return self.table("github", exact=exact)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        t = self.totals["base"]
        return f"Report({len(self.layers)} layers, M={self.M}, base mults={t['mults']}, params={t['params']})"


# ------------------------------------------------------------------------------------------
def _analyze(model, example_inputs, M, filter_fn, dense_input_layers) -> Plan:
    from sas_compile.api import analyze

    return analyze(model, example_inputs, M=M, filter_fn=filter_fn, dense_input_layers=dense_input_layers)


def _sws_widths(plan: Plan, Ms, example_inputs, filter_fn=None,
                dense_input_layers: bool = True) -> Tuple[Dict[int, Optional[Dict[str, Any]]], List[str]]:
    """Whole-graph SWS widths per node at every M (one analysis, decided per M), and notes on what failed.

    ``filter_fn`` and ``dense_input_layers`` are those ``swsify`` takes, so the SWS columns
    count the model ``swsify(model, M=M, filter_fn=..., dense_input_layers=...)`` builds.
    """
    if plan.gm is None:
        return {m: None for m in Ms}, ["SWS widths: the plan has no graph; standalone per-layer rule used"]
    from sas_compile.passes.tie_channel_widths import analyze_channel_widths

    try:
        analysis = analyze_channel_widths(plan.gm, example_inputs, filter_fn=filter_fn,
                                          dense_input_layers=dense_input_layers)
    except Exception as exc:  # noqa: BLE001 - a report must not die on the baseline column
        log.warning("SWS width analysis failed: %s", exc)
        return {m: None for m in Ms}, [f"SWS widths: whole-graph analysis failed ({exc}); standalone per-layer rule used"]
    widths, notes = {}, []
    for m in Ms:
        try:
            widths[m] = analysis.at(m).layers
        except Exception as exc:  # noqa: BLE001
            log.warning("SWS width decision failed at M=%d: %s", m, exc)
            widths[m] = None
            notes.append(f"SWS widths at M={m}: whole-graph decision failed ({exc}); standalone per-layer rule used")
    return widths, notes


def _built_dense_widths(layer: LayerPlan) -> Any:
    """SWS widths of an unmasked layer of a model swsify built: its own widths, dense."""
    co = layer.out_channels
    return types.SimpleNamespace(in_channels=layer.in_channels, out_channels=co,
                                 in_features=layer.weight_numel // co if co else 0, out_features=co,
                                 widened=False, sparse=False)


def _resolved_layer(layer: LayerPlan) -> Tuple[LayerPlan, Optional[str]]:
    """A layer with known channel widths; functional calls with computed weights use shapes."""
    if layer.in_channels > 0 and layer.out_channels > 0:
        return layer, None
    fixed = copy.copy(layer)
    if layer.op == "linear" and layer.input_shape and layer.output_shape:
        fixed.in_channels, fixed.out_channels = int(layer.input_shape[-1]), int(layer.output_shape[-1])
        return fixed, None
    return None, f"{layer.name}: weight shape unknown (computed inside the graph); not counted"


def _symbolic_positions(layer: LayerPlan) -> Optional[Tuple[int, str]]:
    """Output positions as (number, product of the traced dim formulas, kept as torch prints them)."""
    if layer.symbolic_output_shape is None:
        return None
    out = list(layer.symbolic_output_shape)
    inp = list(layer.symbolic_input_shape or ())
    nk = len(layer.kernel_size) or None
    if "transpose" in layer.op:
        out = inp
    if layer.op == "linear":
        dims = out[:-1]
    elif nk is not None and len(out) == nk + 1:
        dims = out[1:]
    else:
        dims = out[:1] + out[2:]
    coefficient = 1
    factors = []
    for d in dims:
        if d.isdigit():
            coefficient *= int(d)  # a size the graph pins: fold it into the number
        else:
            factors.append(d if d.replace("_", "").isalnum() else f"({d})")
    return coefficient, "*".join(factors) if factors else "1"


def _mark_sws_layers(model: nn.Module, plan: Plan) -> List[str]:
    """Set ``extra['sws_M']`` on layers whose weight carries the SWS 1:M mask; their names."""
    names = []
    for layer in plan.layers:
        path = layer.module_target or (layer.weight_target or "").rsplit(".", 1)[0]
        try:
            mod = model.get_submodule(path) if path else None
        except AttributeError:
            continue
        mask = sws_mask_of(mod, "weight") if mod is not None else None
        if mask is not None:
            layer.extra["sws_M"] = int(mask.M)
            names.append(layer.name)
    return names


def _check_swat(swat: Any) -> Tuple[float, ...]:
    """``swat`` as a tuple of distinct sparsities in [0, 1) (clear error otherwise)."""
    if swat is None:
        return ()
    values = (swat,) if isinstance(swat, (int, float)) else swat
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"swat={swat!r}: expected a sparsity in [0, 1) or a sequence of them, "
                         "e.g. swat=0.9 or swat=(0.8, 0.9)") from None
    if not values:
        raise ValueError("swat is empty: give at least one sparsity, e.g. swat=(0.8, 0.9)")
    out: List[float] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"swat={swat!r}: {value!r} is not a sparsity in [0, 1) (the removed "
                             "fraction of weights and activations, e.g. 0.8 or 0.9)")
        if float(value) not in out:
            out.append(float(value))
    return tuple(out)


def _as_dense_layer(layer: nn.Module) -> nn.Module:
    """The nn.Linear/Conv1d/Conv2d a SWAT layer was made from, sharing its weight and bias."""
    from .swat import SWATConv1d, SWATLinear

    w = layer.weight
    if isinstance(layer, SWATLinear):
        dense = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, device="meta")
    else:
        n = 1 if isinstance(layer, SWATConv1d) else 2
        padding: Any = tuple(layer.padding)
        mode = "zeros"
        if layer.pre_pad is not None:
            # pre_pad is the conv's reversed (left, right) padding per dim; only 'same' is asymmetric
            pairs = [layer.pre_pad[2 * i: 2 * i + 2] for i in range(n)][::-1]
            padding = tuple(a for a, _ in pairs) if all(a == b for a, b in pairs) else "same"
            mode = "zeros" if layer.pad_mode == "constant" else layer.pad_mode
        cls = nn.Conv1d if n == 1 else nn.Conv2d
        dense = cls(w.shape[1] * layer.groups, w.shape[0], tuple(w.shape[2:]), stride=layer.stride,
                    padding=padding, dilation=layer.dilation, groups=layer.groups,
                    bias=layer.bias is not None, padding_mode=mode, device="meta")
    dense.weight = layer.weight
    dense.bias = layer.bias
    return dense.train(layer.training)


def _dense_view(model: nn.Module, swat_modules: Dict[str, nn.Module]) -> nn.Module:
    """A copy of a swatified model with its SWAT layers (and BitmaskReLUs) as the plain modules.

    Why: the analysis traces through a SWAT layer's masked weight and cannot see its shape;
    the plain module has the same shapes and mults, so the plan and the base/SAS/SWS columns
    are those of the model swatify started from.
    """
    from .swat import BitmaskReLU

    if "" in swat_modules:
        return _as_dense_layer(model)
    view = copy.deepcopy(model)
    swaps = {name: _as_dense_layer(view.get_submodule(name)) for name in swat_modules}
    swaps.update({n: nn.ReLU() for n, m in view.named_modules() if isinstance(m, BitmaskReLU)})
    for name, module in swaps.items():
        parent, _, child = name.rpartition(".")
        setattr(view.get_submodule(parent) if parent else view, child, module)
    return view


def _own_sparsity(swat_modules: Dict[str, nn.Module]) -> float:
    """The ``sparsity`` swatify was given: 1 - the one sparse density (uniform), else 1 - the
    weight-weighted density (ERK keeps exactly that fraction of all SWAT weights)."""
    sparse = {m.weight_density for m in swat_modules.values() if m.weight_density < 1.0}
    if len(sparse) <= 1:
        return round(1.0 - sparse.pop(), 6) if sparse else 0.0
    kept = sum(m.weight_density * m.weight.numel() for m in swat_modules.values())
    return round(1.0 - kept / sum(m.weight.numel() for m in swat_modules.values()), 6)


def _free_names(formula: str) -> set:
    return {str(sym) for sym in sympy.sympify(formula).free_symbols}


def report(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    M: Union[int, Iterable[int]] = (2, 4, 8),
    filter_fn: Optional[Callable[[Optional[nn.Module], str], bool]] = None,
    dense_input_layers: bool = True,
    symbolic: bool = True,
    swat: Union[None, float, Sequence[float]] = None,
) -> Report:
    """Count mults and params of every conv/linear layer of ``model``: base, SAS and SWS per M.

    ``example_inputs`` (a tensor or a tuple of positional inputs) gives exact counts for that
    input and formulas in its sizes; without it counts are per output position.
    ``filter_fn(module, fqn)`` and ``dense_input_layers`` are passed to the analysis, as in
    ``sasify``, and to the SWS width analysis, as in ``swsify``: the SWS columns count what
    ``swsify(model, M=m, filter_fn=..., dense_input_layers=...)`` builds (by default the
    layer reading the raw network input widens its output but keeps a dense weight). ``symbolic=False`` skips the formulas (faster on large graphs).

    ``swat`` (a sparsity in [0, 1) or a sequence, e.g. ``(0.8, 0.9)``) adds SWAT training
    mults per sparsity: ``sas_compile.swat.swat_costs`` of each layer at the densities
    ``swatify(model, sparsity=s, example_inputs=..., filter_fn=filter_fn)`` gives it
    (uniform, unstructured: the layer reading the raw input and layers swatify does not
    convert count dense), plus ``swat_costs`` at density 1 as the dense-training reference.
    A model already converted by ``swatify`` reports its SWAT layers at their own densities
    (at every requested sparsity, or at its own sparsity when ``swat`` is None).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    Ms = accounting.check_M_values(M)
    sparsities = _check_swat(swat)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    # a model can only hold SWAT layers once sas_compile.swat is imported
    swat_module = sys.modules.get("sas_compile.swat")
    swat_modules = swat_module.swat_layers(model) if swat_module is not None else {}
    notes: List[str] = []
    if swat_modules:
        model = _dense_view(model, swat_modules)
        if not sparsities:
            sparsities = (_own_sparsity(swat_modules),)
        notes.append(f"{len(swat_modules)} layers are SWAT layers: their SWAT columns count their own densities "
                     f"at every sparsity; other layers count dense")
    swat_sparse: Dict[str, bool] = {}
    if sparsities and not swat_modules:
        from .swat import _discover_layers

        # the layers swatify converts, and the raw-input layer its uniform rule keeps dense
        names, first = _discover_layers(model, example_inputs, filter_fn)
        swat_sparse = {n: n != first for n in names}
    # eligibility may depend on M: one analysis per M, layers matched by node name
    plans = {m: _analyze(model, example_inputs, m, filter_fn, dense_input_layers) for m in Ms}
    first = plans[Ms[0]]
    symbols: Dict[str, int] = {}
    if example_inputs is not None and symbolic and first.gm is not None:
        from sas_compile.passes.propagate_symbolic_shapes import propagate_symbolic_shapes

        try:
            symbols = propagate_symbolic_shapes(first, example_inputs)
        except Exception as exc:  # noqa: BLE001 - numbers still come from the example shapes
            log.warning("symbolic shapes unavailable: %s", exc)
            notes.append(f"symbolic formulas unavailable: {exc}")
    # one SWS width analysis of the graph (the first plan's: rows are its layers), decided per M
    widths, why = _sws_widths(first, Ms, example_inputs, filter_fn, dense_input_layers)
    notes.extend(w for w in why if w not in notes)

    masked = _mark_sws_layers(model, first)
    # a model swsify built: its unmasked layers (dense input layer, excluded or unwidened) are SWS as they are
    built_sws = getattr(model, "sws_layers", None) is not None
    if masked:
        notes.append(f"{len(masked)} layers carry a 1:M SWS weight mask: their base and SWS columns count "
                     "nonzero weights (" + ", ".join(masked[:4]) + (", ..." if len(masked) > 4 else "") + ")")
    rows = []
    per_position = example_inputs is None
    # total formula: weights summed per distinct positions formula
    by_positions: Optional[Dict[str, int]] = {}
    for layer in first.layers:
        resolved, why = _resolved_layer(layer)
        if resolved is None:
            notes.append(why)
            continue
        positions: Any = 1
        if not per_position:
            positions = accounting.output_positions(layer.op, layer.output_shape, layer.input_shape,
                                                    len(layer.kernel_size) or None)
            if positions is None:
                positions = 1
                notes.append(f"{layer.name}: output shape unknown, counted per output position")
        eligible_at = {}
        for m in Ms:
            other = plans[m].by_node().get(layer.node)
            eligible_at[m] = other.eligible if other is not None else layer.eligible
        sws = {m: (widths[m] or {}).get(layer.node) for m in Ms}
        if built_sws and "sws_M" not in resolved.extra:
            sws = {m: _built_dense_widths(resolved) for m in Ms}
        row = accounting.layer_costs(resolved, Ms, positions=positions,
                                     sws_widths={m: w for m, w in sws.items() if w is not None},
                                     eligible_at=eligible_at)
        if not all(eligible_at.values()) and layer.eligible:
            row["eligible"] = False
            dense_at = [m for m in Ms if not eligible_at[m]]
            row["reason"] = "; ".join(f"M={m}: {plans[m].by_node()[layer.node].reason}" for m in dense_at)
        if sparsities:
            _add_swat_costs(row, resolved, int(positions), sparsities, swat_modules, swat_sparse)
        sym_pos = _symbolic_positions(layer) if not per_position else (1, "1")
        if sym_pos is None:
            by_positions = None
            row["symbolic"]["base_mults"] = str(row["base"]["mults"])
        else:
            sws_M = resolved.extra.get("sws_M")
            per_pos = -(-resolved.weight_numel // sws_M) if sws_M else resolved.weight_numel
            weight = sym_pos[0] * per_pos
            row["symbolic"]["base_mults"] = f"{weight}*{sym_pos[1]}" if sym_pos[1] != "1" else str(weight)
            if by_positions is not None:
                by_positions[sym_pos[1]] = by_positions.get(sym_pos[1], 0) + weight
        rows.append(row)

    input_shapes = None
    if example_inputs is not None:
        input_shapes = [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)]
    total_text = None
    if by_positions and not per_position:
        total_text = " + ".join(f"{w}*{p}" if p != "1" else str(w) for p, w in by_positions.items())
        used = set().union(*(_free_names(r["symbolic"]["base_mults"]) for r in rows)) if rows else set()
        symbols = {k: v for k, v in symbols.items() if k in used}
        if not used:
            total_text = None
    return Report(rows, Ms, per_position=per_position, input_shapes=input_shapes, symbols=symbols,
                  symbolic_total=total_text, plans=plans, notes=notes, swat=sparsities)


def _add_swat_costs(row: Dict[str, Any], layer: LayerPlan, positions: int, sparsities: Tuple[float, ...],
                    swat_modules: Dict[str, nn.Module], swat_sparse: Dict[str, bool]) -> None:
    """Set ``row["swat"]`` and ``row["swat_dense"]``; every count comes from ``swat_costs``."""
    from .swat import swat_costs

    own = swat_modules.get(layer.module_target) if layer.module_target is not None else None
    source = own if own is not None else layer
    row["swat_dense"] = swat_costs(source, 1.0, 1.0, structure="unstructured", output_positions=positions)
    row["swat"] = {}
    for s in sparsities:
        if own is not None:
            costs = swat_costs(own, output_positions=positions)
        else:
            density = 1.0 - s if swat_sparse.get(layer.module_target, False) else 1.0
            costs = swat_costs(layer, density, density, structure="unstructured", output_positions=positions)
        row["swat"][s] = {k: int(costs[k]) for k in SWAT_KEYS}
    row["swat_dense"] = {k: int(row["swat_dense"][k]) for k in SWAT_KEYS}


class _CallableModule(types.ModuleType):
    """``import sas_compile.report`` binds the submodule over the function of the same name."""

    def __call__(self, *args, **kwargs):
        return report(*args, **kwargs)


# keep `sas_compile.report(model)` working after `import sas_compile.report`
sys.modules[__name__].__class__ = _CallableModule
