"""``sas_compile.report(model)``: exact mult and parameter counts for base, SAS and SWS.

Users decide whether SAS is worth it from these numbers before training anything. The
report runs the analysis once (``sas_compile.api.analyze``: the plan does not depend on M),
counts every layer with the cost registry of ``passes/costs.py`` (the one table of
formulas) at each M, and takes SWS widths from the whole-graph SWS analysis, so the three
columns agree with what ``sasify`` and ``swsify`` build. With ``swat=`` it adds SWAT training
mults (forward, backward input gradient, backward weight gradient) per sparsity for the
layers ``swatify`` would convert. :class:`~sas_compile.report_table.Report` formats the rows.

Without example inputs every count is per output position (the paper's "for a single
pixel"); with them counts are exact for that input, and ``symbolic.base_mults`` gives each
layer's mults as a formula in the input sizes (``batch``, ``height``, ``width``, ``seq``...).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .accounting import layer_costs
from .api import AnalysisOptions, analyze, check_filter_fn, check_model
from .passes import costs
from .passes.costs import check_M_values
from .passes.capture import CaptureError, bind_example_inputs, capture_seeing_into_leaves, copy_model
from .passes.find_sas_layers import opaque_kind, opaque_projection_reason
from .passes.lower_sws_to_packed import MODULE_BIAS, PackedSWSLinear
from .passes.pipeline import analyze_graph, module_plan
from .passes.sws_width_rules import has_width_rule
from .passes.tie_channel_widths import analyze_channel_widths
from .runtime.sws_mask import drop_parametrization, sws_masks
from .passes.plan import LayerPlan, Plan
from . import swat as swat_module
from .report_table import SWAT_KEYS, Report
from .swat import BitmaskReLU, SWATConvTranspose, SWATLinear

log = logging.getLogger("sas_compile.report")

__all__ = ["report", "check_sparsities"]


def _sws_widths(plan: Plan, Ms, example_inputs, filter_fn=None,
                dense_input_layers: bool = True) -> Tuple[Dict[int, Optional[Dict[str, Any]]], List[str]]:
    """Whole-graph SWS widths per node at every M (one analysis, decided per M), and notes on what failed.

    ``filter_fn`` and ``dense_input_layers`` are those ``swsify`` takes, so the SWS columns
    count the model ``swsify(model, M=M, filter_fn=..., dense_input_layers=...)`` builds.
    """
    if plan.gm is None:
        return {m: None for m in Ms}, ["SWS widths: the plan has no graph; standalone per-layer rule used"]
    try:
        analysis = analyze_channel_widths(plan.gm, example_inputs, filter_fn=filter_fn,
                                          dense_input_layers=dense_input_layers, model=plan.model)
    except Exception as exc:  # noqa: BLE001 - a report must not die on the baseline column
        log.info("SWS width analysis failed: %s", exc)
        return {m: None for m in Ms}, [f"SWS widths: whole-graph analysis failed ({exc}); standalone per-layer rule used"]
    widths, notes = {}, []
    for m in Ms:
        try:
            widths[m] = analysis.at(m)
        except Exception as exc:  # noqa: BLE001
            log.info("SWS width decision failed at M=%d: %s", m, exc)
            widths[m] = None
            notes.append(f"SWS widths at M={m}: whole-graph decision failed ({exc}); standalone per-layer rule used")
    return widths, notes


def _seeing_into_opaque_modules(model: nn.Module, example_inputs, plan: Plan, filter_fn,
                                dense_input_layers: bool) -> Optional[Plan]:
    """The plan of the graph ``swsify`` builds from, where symbolic tracing left modules with
    projections inside opaque (``nn.MultiheadAttention``, transformer layers): torch.export
    shows their linears, so their mults are counted, and the SWS columns are those of the model
    swsify builds, which widens through them. sasify keeps their projections dense, and so do the
    SAS columns here. None where there are none, or export fails (the traced plan then stands)."""
    holders = {layer.module_target for layer in plan.layers if layer.op not in costs.LAYER_OPS
               and layer.module_target is not None
               and opaque_kind(model.get_submodule(layer.module_target)) in ("attention", "transformer")}
    if not holders:  # an RNN's or a bilinear layer's op is one call in an exported graph too
        return None
    try:
        with warnings.catch_warnings():  # export's notes on the model's attributes: the traced plan stands
            warnings.simplefilter("ignore")
            captured = capture_seeing_into_leaves(model, example_inputs, sees_into=has_width_rule)
    except CaptureError:
        return None
    if captured.method != "export":
        return None
    seen = analyze_graph(captured.gm, "export", AnalysisOptions(filter_fn, bool(dense_input_layers), True),
                         model=model, example_inputs=captured.example_inputs)
    for layer in seen.layers:
        path = layer.module_target or layer.name
        holder = next((h for h in sorted(holders) if path == h or path.startswith(h + ".")), None)
        if holder is not None and layer.op in costs.LAYER_OPS:
            module = model.get_submodule(holder)  # sasify never sees the layer: its module's reason holds
            layer.eligible = False
            layer.reason = (opaque_projection_reason(opaque_kind(module), type(module).__name__)
                            + f"; inside {holder}, counted from its projections")

    def computed(layers):
        return sum(layer.weight_kind == "computed" for layer in layers if layer.op in costs.LAYER_OPS)

    if computed(seen.layers) > computed(plan.layers):
        return None  # slices of one parameter (attention's q/k/v from in_proj_weight) would count it twice
    return seen


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


def _mark_sws_layers(plan: Plan, masks: Dict[str, int]) -> List[str]:
    """Set ``sws_M`` on layers whose weight carries the SWS 1:M mask (``masks``: weight path -> M); their names."""
    names = []
    for layer in plan.layers:
        target = f"{layer.module_target}.weight" if layer.module_target else layer.weight_target
        if target in masks:
            layer.sws_M = masks[target]
            names.append(layer.name)
    return names


def _unmasked_view(model: nn.Module) -> Tuple[nn.Module, Dict[str, int]]:
    """A copy of ``model`` sharing its tensors, each SWS-masked weight back to its stored dense
    parameter and each layer ``lower_sws`` packed a linear of its shape, and ``{weight path: M}``
    of those masks and packed layers.

    Why: where a weight is read as an attribute (a ``torch.export``-built SWS model reads every
    weight so), tracing follows the mask's parametrization into its ops, and through a packed
    layer it follows the unpacking: the analysis saw a weight computed in the graph ("nothing to
    widen", every weight counted) and the module holding the original (or the bias) as a second,
    parameters-only row. The stand-ins have the weights' shapes, and the M is all the counts
    need (``ceil(numel / M)`` nonzeros).
    """
    masks = sws_masks(model)
    packed = [path for path, module in model.named_modules() if isinstance(module, PackedSWSLinear)]
    if not masks and not packed:
        return model, masks
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    view = copy_model(model, shared)
    for target in masks:
        parent, _, name = target.rpartition(".")
        try:
            owner = view.get_submodule(parent) if parent else view
        except AttributeError:  # a copied GraphModule holds only what its graph reads
            continue
        if parametrize.is_parametrized(owner, name):
            drop_parametrization(owner, name)
    for path in packed:
        module = view.get_submodule(path)
        masks[f"{path}.weight" if path else "weight"] = int(module.M)
        if path:
            view.set_submodule(path, _PackedAsLinear(module))
        else:
            view = _PackedAsLinear(module)
    return view, masks


class _PackedAsLinear(nn.Linear):
    """A lowered SWS layer (:class:`PackedSWSLinear`) as the analysis sees it: a linear whose weight
    is a stand-in of the packed weight's shape (one zero, expanded: no memory) and whose bias is the
    layer's. Called with the bias a functional call site passes, as the packed layer is."""

    def __init__(self, packed: PackedSWSLinear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = packed.in_features, packed.out_features
        zero = packed.values.new_zeros(())
        self.weight = nn.Parameter(zero.expand(packed.out_features, packed.in_features), requires_grad=False)
        self.bias = packed.bias
        self.train(packed.training)

    def forward(self, x: Tensor, bias: Any = MODULE_BIAS) -> Tensor:
        return F.linear(x, self.weight, self.bias if bias is MODULE_BIAS else bias)


def check_sparsities(swat: Any) -> Tuple[float, ...]:
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
    """The nn.Linear/Conv1d/2d/3d/ConvTranspose1d/2d/3d a SWAT layer was made from, sharing its weight and bias."""
    w = layer.weight
    if isinstance(layer, SWATLinear):
        dense = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, device="meta")
    elif isinstance(layer, SWATConvTranspose):
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[w.dim() - 3]
        dense = cls(w.shape[0], w.shape[1] * layer.groups, tuple(w.shape[2:]), stride=layer.stride,
                    padding=layer.padding, output_padding=layer.output_padding, groups=layer.groups,
                    bias=layer.bias is not None, dilation=layer.dilation, device="meta")
    else:
        n = w.dim() - 2
        padding: Any = tuple(layer.padding)
        mode = "zeros"
        if layer.pre_pad is not None:
            # pre_pad is the conv's reversed (left, right) padding per dim; only 'same' is asymmetric
            pairs = [layer.pre_pad[2 * i: 2 * i + 2] for i in range(n)][::-1]
            padding = tuple(a for a, _ in pairs) if all(a == b for a, b in pairs) else "same"
            mode = "zeros" if layer.pad_mode == "constant" else layer.pad_mode
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1]
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
    if "" in swat_modules:
        return _as_dense_layer(model)
    view = copy_model(model)
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

    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs)
    gives exact counts for that input and formulas in its sizes; without it counts are per output position.
    ``filter_fn(module, fqn)`` and ``dense_input_layers`` are passed to the analysis, as in
    ``sasify``, and to the SWS width analysis, as in ``swsify``: the SWS columns count what
    ``swsify(model, M=m, filter_fn=..., dense_input_layers=...)`` builds (by default the
    layer reading the raw network input widens its output but keeps a dense weight).
    The formulas are computed when first read (the table, ``to_dict``, ``symbolic_total``), as
    they cost more than the counts; ``symbolic=False`` leaves them out.

    ``swat`` (a sparsity in [0, 1) or a sequence, e.g. ``(0.8, 0.9)``) adds SWAT training
    mults per sparsity at the densities ``swatify(model, sparsity=s, example_inputs=...,
    filter_fn=filter_fn)`` gives each layer (uniform, unstructured: the layer reading the raw
    input and layers swatify does not convert count dense), plus dense training as the
    reference. A model already converted by ``swatify`` reports its SWAT layers at their own
    densities (at every requested sparsity, or at its own sparsity when ``swat`` is None).
    """
    check_model(model)
    Ms = check_M_values(M)
    sparsities = check_sparsities(swat)
    check_filter_fn(filter_fn)
    example_inputs = bind_example_inputs(model, example_inputs)
    swat_modules = swat_module.swat_layers(model)
    # a model swsify built: its unmasked layers (dense input layer, excluded or unwidened) are SWS as they are
    built_sws = getattr(model, "sws_layers", None) is not None
    model, masks = _unmasked_view(model)
    notes: List[str] = []
    if swat_modules:
        model = _dense_view(model, swat_modules)
        if not sparsities:
            sparsities = (_own_sparsity(swat_modules),)
        notes.append(f"{len(swat_modules)} layers are SWAT layers: their SWAT columns count their own densities "
                     f"at every sparsity; other layers count dense")
    # one analysis for every M: eligibility does not depend on M
    try:
        plan = analyze(model, example_inputs, filter_fn=filter_fn, dense_input_layers=dense_input_layers,
                       dynamo_fallback=True)
    except CaptureError as error:
        if example_inputs is not None:
            raise
        plan = module_plan(model, AnalysisOptions(filter_fn, dense_input_layers, fold_relu=False), error)
    if example_inputs is not None and plan.capture == "symbolic_trace":
        seen = _seeing_into_opaque_modules(model, example_inputs, plan, filter_fn, dense_input_layers)
        if seen is not None:
            plan = seen
            notes.append("attention and transformer-layer modules are counted from their projections, which "
                         "torch.export shows (swsify widens through them); sasify keeps them dense")
    if plan.capture == "dynamo":
        notes.append("captured by dynamo (neither symbolic tracing nor torch.export captures it whole), the "
                     "layers of every graph counted; graph breaks: " + "; ".join(plan.graph_breaks))
        if plan.not_in_graphs:
            listed = "; ".join(plan.not_in_graphs[:4]) + ("; ..." if len(plan.not_in_graphs) > 4 else "")
            notes.append(f"{len(plan.not_in_graphs)} layer modules are in no captured graph as a layer and stay "
                         f"dense: {listed}")
    swat_sparse: Dict[str, bool] = {}
    if sparsities and not swat_modules:
        # the layers swatify converts, and the raw-input layer its uniform rule keeps dense
        names, first = swat_module.discover_layers(model, example_inputs, filter_fn, plan)
        swat_sparse = {n: n != first for n in names}
    # one SWS width analysis of the graph, decided per M
    widths, why = _sws_widths(plan, Ms, example_inputs, filter_fn, dense_input_layers)
    notes.extend(w for w in why if w not in notes)

    masked = _mark_sws_layers(plan, masks)
    if masked:
        layers = "1 layer carries" if len(masked) == 1 else f"{len(masked)} layers carry"
        notes.append(f"{layers} a 1:M SWS weight mask: their base and SWS columns count "
                     "nonzero weights (" + ", ".join(masked[:4]) + (", ..." if len(masked) > 4 else "") + ")")
    rows = []
    per_position = example_inputs is None
    counted_layers: List[Tuple[Dict[str, Any], LayerPlan, LayerPlan]] = []
    # every parameter is counted once: by the first conv/linear row that uses it, else by a
    # parameters-only row of its module
    names_by_id = {id(p): n for n, p in model.named_parameters()}
    counted: set = set()
    opaque: Dict[str, LayerPlan] = {}
    shared_rows: List[str] = []
    for layer in plan.layers:
        if layer.op not in costs.LAYER_OPS:
            opaque[layer.module_path] = layer
            continue
        resolved, why = _resolved_layer(layer)
        if resolved is None:
            notes.append(why)
            continue
        positions: Any = 1
        if not per_position:
            positions = resolved.output_positions
            if positions is None:
                positions = 1
                notes.append(f"{layer.name}: output shape unknown, counted per output position")
        sws = {m: (widths[m].layers if widths[m] is not None else {}).get(layer.node) for m in Ms}
        row = layer_costs(resolved, Ms, positions=positions, sws_widths={m: w for m, w in sws.items() if w is not None},
                          sws_dense=built_sws and not resolved.sws_M)
        if sparsities:
            _add_swat_costs(row, resolved, int(positions), sparsities, swat_modules, swat_sparse)
        own = _layer_parameter_names(layer, model, names_by_id)
        reused = {role for role, name in own.items() if name is not None and name in counted}
        if reused:
            # a module called twice, or a weight (or bias) tied to a counted one: only the
            # tensors not counted yet count here
            kept = None
            if reused == {"weight"} and own["bias"] is not None:
                kept = "bias"
            elif reused == {"bias"} and own["weight"] is not None:
                kept = "weight"
            _keep_params_of(row, kept, resolved, Ms, positions, sws, built_sws)
            shared_rows.append(layer.name)
        counted |= {name for name in own.values() if name is not None}
        row["symbolic"]["base_mults"] = str(row["base"]["mults"])
        counted_layers.append((row, layer, resolved))
        rows.append(row)

    if shared_rows:
        notes.append(f"{len(shared_rows)} call sites reuse a weight counted at another site: their params count only "
                     "what no other site counts "
                     "(" + ", ".join(shared_rows[:4]) + (", ..." if len(shared_rows) > 4 else "") + ")")
    # a model swsify built is already wide: its other parameters are SWS as they are
    leftover = _parameters_only_rows(model, names_by_id, counted, opaque, Ms, {} if built_sws else widths, sparsities)
    if leftover:
        uncosted = [r["name"] for r in leftover if r["name"] in opaque]
        notes.append(f"{len(leftover)} modules hold parameters outside conv/linear calls: their params are counted, "
                     "their mults are not (the paper counts conv/linear mults)"
                     + (f"; mults not costed: {', '.join(uncosted)}" if uncosted else ""))

    input_shapes = None
    if example_inputs is not None:
        input_shapes = [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)]
    formulas = None
    if symbolic and not per_position and plan.gm is not None:
        def formulas():  # noqa: E306 - run the first time the report's formulas are read
            return _symbolic_formulas(plan, example_inputs, counted_layers, notes)
    return Report(rows, Ms, per_position=per_position, input_shapes=input_shapes, plan=plan, notes=notes,
                  swat=sparsities, parameters=leftover, formulas=formulas)


def _symbolic_formulas(plan: Plan, example_inputs, counted_layers, notes: List[str]) -> Tuple[Dict[str, int], Optional[str]]:
    """Each row's base mults as a formula in the input sizes, and the total; fills the rows.

    Symbolic shape propagation is the slowest part of a report, so it runs only when a report's
    formulas are read (its table, dict, CSV, ``symbolic_total``).
    """
    from .passes.propagate_symbolic_shapes import try_propagate_symbolic_shapes

    symbols, why = try_propagate_symbolic_shapes(plan, example_inputs)
    if why is not None:
        log.info("symbolic shapes unavailable: %s", why)
        notes.append(f"symbolic formulas unavailable: {why}")
        return {}, None
    by_positions: Optional[Dict[str, int]] = {}
    for row, layer, resolved in counted_layers:
        sym_pos = _symbolic_positions(layer)
        if sym_pos is None:
            by_positions = None
            continue
        per_pos = -(-resolved.weight_numel // resolved.sws_M) if resolved.sws_M else resolved.weight_numel
        weight = sym_pos[0] * per_pos
        row["symbolic"]["base_mults"] = f"{weight}*{sym_pos[1]}" if sym_pos[1] != "1" else str(weight)
        if by_positions is not None:
            by_positions[sym_pos[1]] = by_positions.get(sym_pos[1], 0) + weight
    if not by_positions:
        return {}, None
    total_text = " + ".join(f"{w}*{p}" if p != "1" else str(w) for p, w in by_positions.items())
    used = set().union(*(_free_names(row["symbolic"]["base_mults"]) for row, _, _ in counted_layers))
    if not used:
        return {}, None
    return {k: v for k, v in symbols.items() if k in used}, total_text


def _parameter_tensor(module: nn.Module, attr: str):
    """The stored parameter behind ``module.<attr>``: the original of a parametrized weight, or, where
    the parametrization keeps several (weight_norm: ``original0`` the norms, ``original1`` the
    directions), the one of the weight's shape (the others get parameters-only rows)."""
    if parametrize.is_parametrized(module, attr):
        plist = getattr(module.parametrizations, attr)
        if hasattr(plist, "original"):
            return plist.original
        originals = [t for name, t in plist.named_parameters(recurse=False) if name.startswith("original")]
        shape = getattr(module, attr).shape
        return next((t for t in originals if t.shape == shape), originals[0] if originals else None)
    value = getattr(module, attr, None)
    if isinstance(value, Tensor) and attr not in module._parameters and attr not in module._buffers:
        # computed by a forward pre-hook (old-style weight_norm: from weight_g and weight_v): the
        # module's own parameter of its shape stands for it
        return next((p for p in module._parameters.values() if p is not None and p.shape == value.shape), value)
    return value


def _layer_parameter_names(layer: LayerPlan, model: nn.Module, names_by_id: Dict[int, str]) -> Dict[str, Optional[str]]:
    """The model's parameter names a conv/linear call multiplies with: ``{"weight": ..., "bias": ...}``
    (None where the call has no such parameter, or it is not one of the model's)."""
    tensors: List[Optional[Tensor]] = [None, None]
    if layer.module_target is not None:
        try:
            module = model.get_submodule(layer.module_target)
        except AttributeError:
            module = None
        if module is not None:
            tensors = [_parameter_tensor(module, "weight"), _parameter_tensor(module, "bias")]
    elif layer.weight_kind == "placeholder":
        known = set(names_by_id.values())
        sources = (tuple(layer.parameter_sources) + (None, None))[:2]
        return {role: (name if name in known else None) for role, name in zip(("weight", "bias"), sources)}
    elif layer.weight_kind == "attr":
        bias = getattr(layer.call, "bias", None)
        targets = [layer.weight_target, bias.target if getattr(bias, "op", None) == "get_attr" else None]
        for i, target in enumerate(targets):
            if target is None:
                continue
            owner, _, attr = target.rpartition(".")
            try:
                module = model.get_submodule(owner) if owner else model
            except AttributeError:
                continue
            tensors[i] = _parameter_tensor(module, attr)
    return {role: (names_by_id.get(id(t)) if t is not None else None) for role, t in zip(("weight", "bias"), tensors)}


_PARAM_KEYS = ("params", "nonzero_params")


def _param_cells(row: Dict[str, Any]):
    """Every (column dict, key) of a row that holds a parameter count."""
    yield row["base"], "params"
    for m in row["sas"]:
        yield row["sas"][m], "params"
    for m in row["sws"]:
        for key in _PARAM_KEYS:
            if key in row["sws"][m]:
                yield row["sws"][m], key


def _keep_params_of(row: Dict[str, Any], kept: Optional[str], resolved: LayerPlan, Ms, positions, sws,
                    built_sws: bool) -> None:
    """Leave in ``row`` the parameter counts of only its ``kept`` tensor ("weight", "bias" or
    None: nothing); the other one is counted at another row."""
    if kept is None:
        for cell, key in _param_cells(row):
            cell[key] = 0
        return
    # the bias's share is what the row counts beyond the same layer without a bias
    without_bias = layer_costs(dataclasses.replace(resolved, has_bias=False), Ms, positions=positions,
                               sws_widths={m: w for m, w in sws.items() if w is not None},
                               sws_dense=built_sws and not resolved.sws_M)
    for (cell, key), (other, _) in zip(_param_cells(row), _param_cells(without_bias)):
        cell[key] = cell[key] - other[key] if kept == "bias" else other[key]


def _owner_path(name: str) -> str:
    parts = name.split(".")
    if "parametrizations" in parts:
        parts = parts[:parts.index("parametrizations")] + ["_"]
    return ".".join(parts[:-1])


def _parameters_only_rows(model: nn.Module, names_by_id: Dict[int, str], counted: set, opaque: Dict[str, LayerPlan],
                          Ms: Sequence[int], widths: Dict[int, Any], sparsities: Sequence[float]) -> List[Dict[str, Any]]:
    """One row per module holding parameters no conv/linear row counted (norms, embeddings,
    attention and recurrent modules, free parameters): params counted, no mults."""
    owners: Dict[str, List[str]] = {}
    for name in names_by_id.values():
        if name not in counted:
            owner = _owner_path(name)
            # an opaque module (attention, recurrent) is one row with everything inside it
            inside = [path for path in opaque if path and (owner == path or owner.startswith(path + "."))]
            owners.setdefault(max(inside, key=len) if inside else owner, []).append(name)
    rows = []
    parameters = dict(model.named_parameters())
    for owner, names in owners.items():
        try:
            cls = type(model.get_submodule(owner)).__name__ if owner else type(model).__name__
        except AttributeError:
            cls = "Parameter"
        n = sum(parameters[name].numel() for name in names)
        layer = opaque.get(owner)
        reason = layer.reason if layer is not None else f"{cls}: parameters only, no conv/linear mults to count"
        sws = {}
        for m in Ms:
            shapes = [widths[m].param_shape(name) if widths.get(m) is not None else None for name in names]
            wide = sum(_numel(s) if s is not None else parameters[name].numel() for name, s in zip(names, shapes))
            sws[m] = {"mults": 0, "params": wide, "nonzero_params": wide, "in_features": 0, "out_features": 0}
        row = {"name": owner or "(model)", "op": cls, "eligible": False, "reason": reason,
               "base": {"mults": 0, "params": n}, "sas": {m: {"mults": 0, "params": n} for m in Ms}, "sws": sws,
               "symbolic": {"base_mults": "0"}}
        if sparsities:
            zeros = {k: 0 for k in SWAT_KEYS}
            row["swat_dense"] = dict(zeros)
            row["swat"] = {s: dict(zeros) for s in sparsities}
        rows.append(row)
    return rows


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _add_swat_costs(row: Dict[str, Any], layer: LayerPlan, positions: int, sparsities: Tuple[float, ...],
                    swat_modules: Dict[str, nn.Module], swat_sparse: Dict[str, bool]) -> None:
    """Set ``row["swat"]`` and ``row["swat_dense"]``, every count from the cost registry."""
    own = swat_modules.get(layer.module_target) if layer.module_target is not None else None

    def counts(weight_density, activation_density, structure):
        c = costs.layer_cost(layer, "swat", positions=positions, weight_density=weight_density,
                             activation_density=activation_density, structure=structure)
        return {k: int(c[k]) for k in SWAT_KEYS}

    row["swat_dense"] = counts(1.0, 1.0, "unstructured")
    row["swat"] = {}
    for s in sparsities:
        if own is not None:
            row["swat"][s] = counts(own.weight_density, own.activation_density, own.structure)
        else:
            density = 1.0 - s if swat_sparse.get(layer.module_path, False) else 1.0
            row["swat"][s] = counts(density, density, "unstructured")
