"""The plan: what the analysis decided about every conv/linear layer of a captured graph.

Data flows one way: capture (FX graph) -> analysis passes (this plan) -> rewrite -> lowering.
The plan is built once per model and does not depend on M: M is a parameter of the rewrite
and of the costs. ``report`` and ``inspect`` read the plan; they never re-derive eligibility.
Its text, dict and Graphviz forms live here too, so every consumer prints the same thing.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from . import costs

__all__ = ["LayerPlan", "Plan", "layer_cost_summary", "render_svg"]


@dataclass
class LayerPlan:
    """One convolution (1-, 2- or 3-D, transposed or not) or linear call site of the captured graph.

    ``name`` is the user's module path (``layer1.0.conv1``) when the layer is a module, or
    the path of the weight's owner for functional calls. ``in_channels`` is the narrow input
    width (``Cin`` of a conv, ``in_features`` of a linear); ``cbar`` is the fan-in per output
    position ``Cin/groups * prod(kernel)``. ``weight_kind`` says where the weight lives:
    ``module`` (a module call), ``attr`` (a ``get_attr`` parameter), ``placeholder`` (a graph
    input, as dynamo lifts parameters) or ``computed`` (made inside the graph).
    """

    name: str
    node: str
    op: str  # "linear" | "conv1d/2d/3d" | "conv_transpose1d/2d/3d" | an unsupported op's name
    eligible: bool
    reason: Optional[str]
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...] = ()
    stride: Tuple[int, ...] = ()
    padding: Any = ()
    dilation: Tuple[int, ...] = ()
    groups: int = 1
    has_bias: bool = False
    weight_target: Optional[str] = None  # attribute path of the weight (get_attr / module) or placeholder name
    module_target: Optional[str] = None  # module path when the call is a module call
    weight_kind: str = "module"
    weight_group: Optional[str] = None  # the call sites of one weight tensor share this key (its first site's weight_target)
    shared_with: Tuple[str, ...] = ()  # the other users of the same weight: call sites, tied modules
    input_is_graph_input: bool = False
    fold_relu: bool = False  # the SAS layer reads the pre-ReLU tensor
    relu_node: Optional[str] = None
    relu_module: Optional[str] = None  # an nn.ReLU module a module swap can replace with nn.Identity for the fold
    fold_relu_reason: Optional[str] = None  # why the ReLU does not fold (None when it does or there is none)
    sas_M: Optional[int] = None  # already a SAS layer with this M
    sws_M: Optional[int] = None  # the weight carries an SWS 1:M mask
    # dynamo graphs: the user's paths of (weight, bias), None where the graph does not say
    parameter_sources: Tuple[Optional[str], ...] = ()
    weight_in_out: bool = False  # the weight is stored [in, out]: addmm(b, x, W), transformers' Conv1D
    input_shape: Optional[Tuple[int, ...]] = None
    output_shape: Optional[Tuple[int, ...]] = None
    symbolic_input_shape: Optional[Tuple[str, ...]] = None
    symbolic_output_shape: Optional[Tuple[str, ...]] = None
    call: Any = field(default=None, repr=False, compare=False)  # the matched call (find_sas_layers.LayerCall)

    @property
    def module_path(self) -> str:
        """The module the call belongs to: its target for a module call, else its name (dynamo
        graphs name a call after the module holding its weight)."""
        return self.module_target or self.name

    @property
    def cbar(self) -> int:
        return costs.fan_in(self)

    @property
    def weight_numel(self) -> int:
        return costs.weight_numel(self)

    @property
    def output_positions(self) -> Optional[int]:
        """Output positions (every dim but the channel one), if shapes are known."""
        n = costs.output_positions(self.op, self.output_shape, self.input_shape, len(self.kernel_size) or None)
        return None if n is None else int(n)

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "call"}
        d["cbar"] = self.cbar
        return d


@dataclass
class Plan:
    """All conv/linear layers of one captured graph, in graph order.

    ``M`` is None for an analysis; a plan that was applied (``sasify``'s ``sas_plan``,
    ``inspect``) records the M it was applied with. ``capture`` is how the graph was
    obtained: ``symbolic_trace``, ``export``, ``dynamo`` or ``modules`` (no graph: the layer
    modules in order, with ``capture_error`` saying why). ``technique`` is what the plan's
    layers become: ``SAS`` (an analysis, ``sasify``, ``inspect``), ``SWS`` (``swsify``: eligible
    layers carry a 1:M weight mask, at the widths they were built with) or ``SWAT`` (``swatify``).
    """

    layers: List[LayerPlan]
    capture: str
    M: Optional[int] = None
    graph_before: Optional[str] = None
    graph_after: Optional[str] = None
    gm: Any = None  # the captured GraphModule (before the rewrite)
    model: Any = None  # the analysed module (an export capture swaps modules in a copy of it)
    example_inputs: Optional[tuple] = None
    capture_error: Optional[BaseException] = None
    graph_breaks: List[str] = field(default_factory=list)
    # a dynamo capture: layer modules of the model that no captured graph calls as a layer, "path: why"
    not_in_graphs: List[str] = field(default_factory=list)
    parameters: Dict[str, Any] = field(default_factory=dict, repr=False)  # dynamo: placeholder -> parameter
    sources: Dict[str, str] = field(default_factory=dict, repr=False)  # dynamo: placeholder -> user path
    lowered: int = 0  # SAS layers written out as projection + dense ops (GPU graphs)
    technique: str = "SAS"
    # a symbolic trace: its constants that depend on the mode (mode_flags.ModeBinding), which a
    # rewritten graph reads at run time; and, where no one graph is the model (a branch on the
    # mode, checkpointing), why, and what the plan keeps unrewritten for it (module swaps only)
    mode_bindings: List[Any] = field(default_factory=list, repr=False)
    not_one_graph: Optional[str] = None

    def eligible(self) -> List[LayerPlan]:
        return [layer for layer in self.layers if layer.eligible]

    def by_node(self) -> Dict[str, LayerPlan]:
        return {layer.node: layer for layer in self.layers}

    def __str__(self) -> str:
        return plan_to_text(self)

    def to_dict(self) -> Dict[str, Any]:
        return plan_to_dict(self)

    def to_dot(self) -> str:
        return plan_to_dot(self)


# ---------------------------------------------------------------------------- formatting


def layer_cost_summary(layer: LayerPlan, M: Optional[int]) -> Dict[str, Any]:
    """Mults and params of one layer before (dense) and after the rewrite at M.

    Mults are for the layer's example input when its output shape is known, else per output
    position (``per_position`` True). A layer that stays dense costs the same after; a plan
    without M (an analysis) reports after = before.
    """
    positions = layer.output_positions
    if layer.in_channels <= 0 or layer.out_channels <= 0 or layer.op not in costs.LAYER_OPS:
        return {"mults_before": None, "mults_after": None, "params_before": None, "params_after": None,
                "per_position": positions is None}
    count = 1 if positions is None else positions
    before = costs.layer_cost(layer, "base", positions=count, sws_M=layer.sws_M)
    if layer.sas_M:
        after = costs.layer_cost(layer, "sas", positions=count, M=layer.sas_M)
        before = after
    elif layer.eligible and M:
        after = costs.layer_cost(layer, "sas", positions=count, M=M)
    else:
        after = before
    return {"mults_before": int(before["mults"]), "mults_after": int(after["mults"]),
            "params_before": int(before["params"]), "params_after": int(after["params"]),
            "per_position": positions is None}


def _sas_M(plan: Plan) -> Optional[int]:
    """The M of a SAS rewrite the costs go to; None for an analysis and for SWS/SWAT plans, whose
    layers are recorded as they were built (their cost is the one they have)."""
    return plan.M if plan.technique == "SAS" else None


def _shape_text(shape) -> str:
    return "x".join(str(s) for s in shape) if shape else "?"


def _sas_text(layer: LayerPlan) -> str:
    if layer.sas_M:
        return f"SAS (M={layer.sas_M})"
    return "yes" if layer.eligible else "no"


def _geometry(layer: LayerPlan) -> str:
    if layer.op not in costs.LAYER_OPS:
        return ""
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


_VERBS = {"SAS": "convert", "SWS": "carry a 1:M weight mask", "SWAT": "are SWAT layers"}


def plan_to_text(plan: Plan) -> str:
    """A readable table of the plan: one line per conv/linear layer, reasons as footnotes."""
    from tabulate import tabulate

    reasons: Dict[str, int] = {}
    rows = []
    per_position = False
    sas_plan = plan.technique == "SAS"
    for layer in plan.layers:
        cost = layer_cost_summary(layer, _sas_M(plan))
        per_position |= bool(cost["per_position"])
        sas = _sas_text(layer)
        if not layer.eligible and layer.reason and not layer.sas_M:
            sas += f" [{reasons.setdefault(layer.reason, len(reasons) + 1)}]"
        shapes = "" if layer.input_shape is None else f"{_shape_text(layer.input_shape)} -> {_shape_text(layer.output_shape)}"
        fmt = lambda n: "?" if n is None else costs.format_count(n)  # noqa: E731
        if sas_plan:
            rows.append([
                layer.name, layer.op, _geometry(layer), shapes, sas,
                "yes" if layer.fold_relu else "", f"{fmt(cost['mults_before'])} -> {fmt(cost['mults_after'])}",
                f"{fmt(cost['params_before'])} -> {fmt(cost['params_after'])}",
            ])
        else:  # the layers as they were built: one cost each
            rows.append([layer.name, layer.op, _geometry(layer), shapes, sas, fmt(cost["mults_before"]),
                         fmt(cost["params_before"])])
    mults = "mults" + (" (per position)" if per_position else "")
    headers = (["layer", "op", "geometry", "input -> output", "SAS", "ReLU folded", mults, "params"] if sas_plan
               else ["layer", "op", "geometry", "input -> output", plan.technique, mults, "params"])
    n = len(plan.eligible())
    at = f"M={plan.M}, " if plan.M else ""
    total = sum(layer.op in costs.LAYER_OPS for layer in plan.layers)
    head = (f"{plan.technique} plan ({at}captured with {plan.capture}): {n} of {total} conv/linear layers "
            f"{_VERBS.get(plan.technique, 'convert')}")
    opaque = len(plan.layers) - total
    if opaque:
        head += f"; {opaque} modules with projections inside stay dense"
    text = [head, tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)]
    if reasons:
        text.append("\n".join(f"[{i}] {r}" for r, i in reasons.items()))
    if plan.graph_breaks:
        text.append("graph breaks: " + "; ".join(plan.graph_breaks))
    if plan.not_one_graph:
        text.append(f"not one graph: {plan.not_one_graph}")
    if plan.not_in_graphs:
        text.append(f"{len(plan.not_in_graphs)} layer modules stay dense, no captured graph calls them as a layer:\n"
                    + "\n".join(f"  {line}" for line in plan.not_in_graphs))
    return "\n".join(text)


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
        d.update(layer_cost_summary(layer, _sas_M(plan)))
        layers.append(d)
    return {
        "technique": plan.technique,
        "M": plan.M,
        "capture": plan.capture,
        "converted": len(plan.eligible()),
        "layers": layers,
        "not_in_graphs": list(plan.not_in_graphs),
        "graph_before": plan.graph_before,
        "graph_after": plan.graph_after,
        "graph_breaks": list(plan.graph_breaks),
        "not_one_graph": plan.not_one_graph,
    }


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def plan_to_dot(plan: Plan) -> str:
    """Graphviz DOT of the captured graph; converted layers green, dense layers orange with the reason.

    Every conv/linear node is annotated with its mults and params before -> after; other
    operations are small grey boxes. Without a graph (a plan built from modules) the
    layers are drawn as a chain in module order.
    """
    by_node = plan.by_node()
    at = f", M={plan.M}" if plan.M else ""
    lines = [
        "digraph sas_plan {",
        "  rankdir=TB;",
        f'  label="{plan.technique} plan{at}: {len(plan.eligible())} of {len(plan.layers)} layers converted";',
        '  node [fontname="Helvetica", fontsize=10];',
    ]

    def layer_node(key: str, layer: LayerPlan) -> str:
        cost = layer_cost_summary(layer, _sas_M(plan))
        fmt = lambda n: "?" if n is None else costs.format_count(n)  # noqa: E731
        label = [layer.name, f"{layer.op} {_geometry(layer)}"]
        if layer.output_shape is not None:
            label.append(f"out {_shape_text(layer.output_shape)}")
        label.append(f"mults {fmt(cost['mults_before'])} -> {fmt(cost['mults_after'])}")
        label.append(f"params {fmt(cost['params_before'])} -> {fmt(cost['params_after'])}")
        if layer.sas_M:
            label.append(f"SAS layer, M={layer.sas_M}")
            color = "lightblue"
        elif layer.eligible:
            label.append(plan.technique + (f" M={plan.M}" if plan.M else "") + (", ReLU folded" if layer.fold_relu else ""))
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
