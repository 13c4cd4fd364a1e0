"""``Report``: the mult and parameter table of ``sas_compile.report`` and its exports.

Formatting only: the counts come from ``sas_compile/reporting.py`` (which reads the plan and
counts with the cost registry of ``passes/costs.py``); this module lays them out as a table
nested by module path (fvcore style), markdown, CSV, JSON or a dict.
"""
from __future__ import annotations

import copy
import csv
import io
import json
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .accounting import sum_costs
from .passes.costs import LAYER_OPS, format_count
from .passes.plan import Plan

__all__ = ["Report", "SWAT_KEYS", "sum_swat", "format_count"]


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}x" if b else "-"


SWAT_KEYS = ("forward_mults", "backward_input_mults", "backward_weight_mults")


def _training(costs: Dict[str, int]) -> int:
    """Training mults of one step: forward plus both backward products."""
    return sum(int(costs[k]) for k in SWAT_KEYS)


def sum_swat(rows: Sequence[Dict[str, Any]], sparsities: Sequence[float]) -> Dict[str, Any]:
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
    ``plan`` is the analysis plan the rows were counted from, ``symbols`` the example value of
    each size symbol, ``per_position`` is True when no example inputs were given.
    ``swat`` holds the SWAT sparsities (float keys of each row's ``"swat"``), empty when
    the report has no SWAT columns; rows then carry no SWAT keys at all. ``parameters`` are
    rows of the same schema for modules holding parameters outside conv/linear calls (norms,
    embeddings, attention or recurrent modules): params counted, no mults; the totals include
    them, so total params equal the model's.
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
        plan: Optional[Plan] = None,
        notes: Optional[List[str]] = None,
        swat: Sequence[float] = (),
        parameters: Optional[List[Dict[str, Any]]] = None,
        formulas: Optional[Callable[[], Tuple[Dict[str, int], Optional[str]]]] = None,
    ):
        self._layers = layers
        self.parameters = list(parameters or [])
        self.M = tuple(M)
        self.per_position = per_position
        self.input_shapes = input_shapes
        self._symbols = dict(symbols or {})
        self._symbolic_total = symbolic_total
        self._formulas = formulas
        self.plan = plan
        self.notes = notes if notes is not None else []  # formulas read later add their notes here
        self.swat = tuple(float(s) for s in swat)
        self.totals = sum_costs(layers + self.parameters, self.M)
        if self.swat:
            self.totals.update(sum_swat(layers + self.parameters, self.swat))

    def _resolve_formulas(self) -> None:
        if self._formulas is not None:
            formulas, self._formulas = self._formulas, None
            self._symbols, self._symbolic_total = formulas()

    @property
    def layers(self) -> List[Dict[str, Any]]:
        """The conv/linear rows (their ``symbolic.base_mults`` formulas filled on first read)."""
        self._resolve_formulas()
        return self._layers

    @property
    def symbols(self) -> Dict[str, int]:
        """The example value of each size symbol of the formulas."""
        self._resolve_formulas()
        return self._symbols

    @property
    def symbolic_total(self) -> Optional[str]:
        """Total base mults as a formula in the input sizes (None without example inputs)."""
        self._resolve_formulas()
        return self._symbolic_total

    # --- machine-readable -------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """``{"layers": [...], "totals": {...}}`` with the schema of issue 6 (M keys are ints).

        With SWAT columns each row also has ``"swat": {sparsity: {"forward_mults",
        "backward_input_mults", "backward_weight_mults"}}`` (float keys) and ``"swat_dense"``
        (the same counts for dense training); totals have both, each with ``training_mults``.
        """
        return {"layers": copy.deepcopy(self.layers), "parameters": copy.deepcopy(self.parameters),
                "totals": copy.deepcopy(self.totals)}

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
        for row in self.layers + self.parameters:
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
        for row in self.layers + self.parameters:
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
            tot = sum_costs(rows, self.M)
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
                line = [indent + name, "", f"{sum(r['eligible'] for r in rows)}/{sum(r['op'] in LAYER_OPS for r in rows)}"]
            line += [fmt(tot["base"]["mults"]), fmt(tot["base"]["params"])]
            for m in self.M:
                s = tot["sws"][m]
                width = ""
                if leaf and rows[0]["op"] in LAYER_OPS:
                    w = rows[0]["sws"][m]
                    width = f"{w['in_features']}x{w['out_features']}"
                line += [fmt(tot["sas"][m]["mults"]), fmt(tot["sas"][m]["params"]), fmt(s["mults"]),
                         f"{fmt(s['params'])} ({fmt(s['nonzero_params'])})", width]
            if self.swat:
                line += self._swat_cells(sum_swat(rows, self.swat), fmt)
            body.append(line)
        t = self.totals
        n_sas = sum(r["eligible"] for r in self.layers)
        n_layers = len(self.layers)
        total = ["total", "", f"{n_sas}/{n_layers}", fmt(t["base"]["mults"]), fmt(t["base"]["params"])]
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
        n_layers = len(self._layers)
        if self.per_position:
            scope = "mults per output position (no example inputs)"
        else:
            shapes = ", ".join("x".join(str(d) for d in s) for s in (self.input_shapes or []))
            scope = f"mults for input {shapes}" if shapes else "mults for the example inputs"
        title = (f"sas-compile report: {n_layers} conv/linear layers, {n_sas} converted to SAS; "
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
        return f"Report({len(self._layers)} layers, M={self.M}, base mults={t['mults']}, params={t['params']})"
