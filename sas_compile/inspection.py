"""``sas_compile.inspect(model, example_inputs)``: the per-layer plan, readable, and the graph.

Why: before training anything, users want to see which layers convert, which stay dense
and why, whether a ReLU folds into a projection, what each layer costs before and after,
and the captured graph before and after the rewrite. This module formats the plan that
``sas_compile.api.analyze`` produces (``Plan.__str__``, ``to_dict`` and ``to_dot`` delegate
here); it never decides eligibility. Costs come from :mod:`sas_compile.accounting`.

Render the DOT text to SVG with :func:`render_svg` (needs the ``graphviz`` Python package
and the Graphviz ``dot`` program: ``pip install graphviz`` and ``apt install graphviz``),
or with ``dot -Tsvg plan.dot -o plan.svg``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from . import accounting
from .plan import LayerPlan, Plan

log = logging.getLogger("sas_compile.inspection")

__all__ = ["inspect", "layer_cost_summary", "plan_to_text", "plan_to_dict", "plan_to_dot", "render_svg"]


def inspect(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    M: int = 2,
    filter_fn: Optional[Callable[[Optional[nn.Module], str], bool]] = None,
    dense_input_layers: bool = True,
    symbolic: bool = True,
) -> Plan:
    """Analyse ``model``, run the SAS rewrite on a copy, and return the plan.

    ``str(plan)`` lists every conv/linear layer with its shapes, eligibility and reason,
    ReLU folding and mults/params before and after; ``plan.to_dict()``, ``plan.to_dot()``
    (Graphviz DOT, converted layers highlighted) and ``plan.graph_before`` /
    ``plan.graph_after`` (FX code) give the rest. ``model`` is not modified.
    """
    from sas_compile.api import analyze, rewrite_plan

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    plan = analyze(model, example_inputs, M=M, filter_fn=filter_fn, dense_input_layers=dense_input_layers)
    if example_inputs is not None and symbolic and plan.gm is not None:
        from sas_compile.passes.propagate_symbolic_shapes import propagate_symbolic_shapes

        try:
            propagate_symbolic_shapes(plan, example_inputs)
        except Exception as exc:  # noqa: BLE001 - formulas are a bonus; numbers still stand
            log.warning("inspect: symbolic shapes unavailable: %s", exc)
    if plan.capture != "modules" and plan.eligible():
        rewrite_plan(plan)
    elif plan.graph_after is None:
        plan.graph_after = plan.graph_before
    return plan


def layer_cost_summary(layer: LayerPlan, M: int) -> Dict[str, Any]:
    """Mults and params of one layer before (dense) and after the plan's rewrite.

    Mults are for the layer's example input when its output shape is known, else per output
    position (``per_position`` True). A layer that stays dense costs the same after.
    """
    positions = accounting.output_positions(layer.op, layer.output_shape, layer.input_shape,
                                            len(layer.kernel_size) or None)
    if layer.in_channels <= 0 or layer.out_channels <= 0:
        return {"mults_before": None, "mults_after": None, "params_before": None, "params_after": None,
                "per_position": positions is None}
    row = accounting.layer_costs(layer, (M,), positions=positions if positions is not None else 1)
    return {
        "mults_before": row["base"]["mults"],
        "mults_after": row["sas"][M]["mults"],
        "params_before": row["base"]["params"],
        "params_after": row["sas"][M]["params"],
        "per_position": positions is None,
    }


def _shape_text(shape) -> str:
    return "x".join(str(s) for s in shape) if shape else "?"


def _sas_text(layer: LayerPlan) -> str:
    if layer.extra.get("sas_M"):
        return f"SAS (M={layer.extra['sas_M']})"
    return "yes" if layer.eligible else "no"


def plan_to_text(plan: Plan) -> str:
    """A readable table of the plan: one line per conv/linear layer, reasons as footnotes."""
    from tabulate import tabulate

    from .report import format_count

    reasons: Dict[str, int] = {}
    rows = []
    per_position = False
    for layer in plan.layers:
        cost = layer_cost_summary(layer, plan.M)
        per_position |= bool(cost["per_position"])
        sas = _sas_text(layer)
        if not layer.eligible and layer.reason and not layer.extra.get("sas_M"):
            sas += f" [{reasons.setdefault(layer.reason, len(reasons) + 1)}]"
        shapes = "" if layer.input_shape is None else f"{_shape_text(layer.input_shape)} -> {_shape_text(layer.output_shape)}"
        fmt = lambda n: "?" if n is None else format_count(n)  # noqa: E731
        rows.append([
            layer.name, layer.op, _geometry(layer), shapes, sas,
            "yes" if layer.fold_relu else "", f"{fmt(cost['mults_before'])} -> {fmt(cost['mults_after'])}",
            f"{fmt(cost['params_before'])} -> {fmt(cost['params_after'])}",
        ])
    headers = ["layer", "op", "geometry", "input -> output", "SAS", "ReLU folded",
               "mults" + (" (per position)" if per_position else ""), "params"]
    n = len(plan.eligible())
    head = (f"SAS plan (M={plan.M}, captured with {plan.capture}): {n} of {len(plan.layers)} "
            f"conv/linear layers convert")
    text = [head, tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)]
    if reasons:
        text.append("\n".join(f"[{i}] {r}" for r, i in reasons.items()))
    return "\n".join(text)


def _geometry(layer: LayerPlan) -> str:
    if layer.op == "linear":
        return f"{layer.in_channels} -> {layer.out_channels}"
    text = f"{layer.in_channels} -> {layer.out_channels}, k={'x'.join(map(str, layer.kernel_size))}"
    if layer.stride and any(s != 1 for s in layer.stride):
        text += f", s={'x'.join(map(str, layer.stride))}"
    if layer.dilation and any(d != 1 for d in layer.dilation):
        text += f", d={'x'.join(map(str, layer.dilation))}"
    if layer.groups != 1:
        text += f", g={layer.groups}"
    return text


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def plan_to_dict(plan: Plan) -> Dict[str, Any]:
    """The plan as plain JSON-able data: M, capture, per-layer fields with costs, FX code."""
    layers = []
    for layer in plan.layers:
        d = _jsonable(layer.to_dict())
        d.update(layer_cost_summary(layer, plan.M))
        layers.append(d)
    return {
        "M": plan.M,
        "capture": plan.capture,
        "converted": len(plan.eligible()),
        "layers": layers,
        "graph_before": plan.graph_before,
        "graph_after": plan.graph_after,
    }


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def plan_to_dot(plan: Plan) -> str:
    """Graphviz DOT of the captured graph; converted layers green, dense layers orange with the reason.

    Every conv/linear node is annotated with its mults and params before -> after; other
    operations are small grey boxes. Without a graph (a plan built from modules) the
    layers are drawn as a chain in module order.
    """
    from .report import format_count

    by_node = plan.by_node()
    lines = [
        "digraph sas_plan {",
        "  rankdir=TB;",
        f'  label="SAS plan, M={plan.M}: {len(plan.eligible())} of {len(plan.layers)} layers converted";',
        '  node [fontname="Helvetica", fontsize=10];',
    ]

    def layer_node(key: str, layer: LayerPlan) -> str:
        cost = layer_cost_summary(layer, plan.M)
        fmt = lambda n: "?" if n is None else format_count(n)  # noqa: E731
        label = [layer.name, f"{layer.op} {_geometry(layer)}"]
        if layer.output_shape is not None:
            label.append(f"out {_shape_text(layer.output_shape)}")
        label.append(f"mults {fmt(cost['mults_before'])} -> {fmt(cost['mults_after'])}")
        label.append(f"params {fmt(cost['params_before'])} -> {fmt(cost['params_after'])}")
        if layer.extra.get("sas_M"):
            label.append(f"SAS layer, M={layer.extra['sas_M']}")
            color = "lightblue"
        elif layer.eligible:
            label.append(f"SAS M={plan.M}" + (", ReLU folded" if layer.fold_relu else ""))
            color = "palegreen"
        else:
            label.append(f"dense: {layer.reason or 'not eligible'}")
            color = "orange"
        return (f'  "{_dot_escape(key)}" [shape=box, style="filled,bold", fillcolor={color}, '
                f'label="{_dot_escape(chr(10).join(label))}"];')

    gm = plan.gm
    if gm is None:
        previous = None
        for layer in plan.layers:
            lines.append(layer_node(layer.node, layer))
            if previous is not None:
                lines.append(f'  "{_dot_escape(previous)}" -> "{_dot_escape(layer.node)}" [style=dashed];')
            previous = layer.node
        lines.append("}")
        return "\n".join(lines)

    shown = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue  # weights clutter the picture; the layer box names them
        shown.add(node.name)
        if node.name in by_node:
            lines.append(layer_node(node.name, by_node[node.name]))
            continue
        if node.op == "placeholder":
            style = 'shape=ellipse, style=filled, fillcolor=lightyellow'
            label = f"input {node.name}"
        elif node.op == "output":
            style = 'shape=ellipse, style=filled, fillcolor=lightyellow'
            label = "output"
        else:
            style = 'shape=box, style="rounded,filled", fillcolor=gray92, fontsize=9'
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            label = f"{node.name}\n{target}" if target != node.name else node.name
        lines.append(f'  "{_dot_escape(node.name)}" [{style}, label="{_dot_escape(label)}"];')
    for node in gm.graph.nodes:
        if node.name not in shown:
            continue
        for src in node.all_input_nodes:
            if src.name in shown:
                lines.append(f'  "{_dot_escape(src.name)}" -> "{_dot_escape(node.name)}";')
    lines.append("}")
    return "\n".join(lines)


def render_svg(dot: str, path: str) -> str:
    """Render DOT text to an SVG file at ``path`` with the ``graphviz`` package; returns ``path``.

    Needs ``pip install graphviz`` and the Graphviz ``dot`` program on PATH
    (``apt install graphviz``); raises RuntimeError saying which one is missing.
    """
    try:
        import graphviz
    except ImportError as exc:
        raise RuntimeError(
            "render_svg needs the graphviz Python package (pip install graphviz) and the Graphviz "
            "programs (apt install graphviz); or write the DOT text to a file and run dot -Tsvg"
        ) from exc
    try:
        svg = graphviz.Source(dot).pipe(format="svg")
    except graphviz.ExecutableNotFound as exc:
        raise RuntimeError(
            "render_svg: the Graphviz 'dot' program is not on PATH (apt install graphviz, or "
            "brew install graphviz); the DOT text itself is available from plan.to_dot()"
        ) from exc
    with open(path, "wb") as f:
        f.write(svg)
    return path
