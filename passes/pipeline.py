"""The order of the passes, in one place: ``sasify``, the ``sas`` backend, ``report`` and
``inspect`` all run these lists and nothing else decides what runs when.

Every pass has one signature, ``pass_(graph_module, plan, config) -> plan``: it reads the
graph and the plan, writes its findings into the plan (an analysis) or changes the graph
(a rewrite), and reads its options from ``config`` (any object with the fields it uses;
``sas_compile.SASConfig`` has them all).

capture (``capture.py``) -> ANALYSIS -> SAS_REWRITE -> GPU_LOWERING
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import fx, nn

from sas_compile.runtime.layers import SAS_LAYERS

from .capture import CaptureError, capture, capture_with_dynamo, clean_module_path
from .find_foldable_relus import find_foldable_relus
from .find_sas_layers import LAYER_MODULES, find_sas_layers, layers_from_modules
from .lower_sas_to_projection import lower_sas_to_projection
from .mode_flags import trace_modes
from .plan import Plan
from .rewrite_layers_to_sas import is_module_swap, keep_module_swaps, rewrite_layers_to_sas

log = logging.getLogger("sas_compile.passes")

__all__ = ["Pass", "ANALYSIS", "SAS_REWRITE", "GPU_LOWERING", "run_passes", "config_for_graph", "analyze_graph",
           "analyze_model", "module_plan"]

Pass = Callable[[fx.GraphModule, Plan, Any], Plan]

# which conv/linear layers convert and why not; where a ReLU folds into a projection
ANALYSIS: Sequence[Pass] = (find_sas_layers, find_foldable_relus)
# the graph change: SAS layers, the wide weights, the folded ReLUs
SAS_REWRITE: Sequence[Pass] = (rewrite_layers_to_sas,)
# on a GPU graph: layers fastest as projection + cuBLAS/cuDNN written out for the inner compiler
GPU_LOWERING: Sequence[Pass] = (lower_sas_to_projection,)


def run_passes(passes: Sequence[Pass], gm: fx.GraphModule, plan: Plan, config) -> Plan:
    """Run ``passes`` in order on ``gm``; each returns the plan the next one reads."""
    for pass_ in passes:
        plan = pass_(gm, plan, config)
        log.debug("pass %s: %d layers, %d eligible", pass_.__name__, len(plan.layers), len(plan.eligible()))
    return plan


def config_for_graph(config, *, resumes: bool):
    """``config`` for one dynamo graph: a graph that resumes after a graph break takes
    activations, not the network's input, so no layer of it is an input layer to keep dense."""
    if resumes and getattr(config, "dense_input_layers", False) and dataclasses.is_dataclass(config):
        return dataclasses.replace(config, dense_input_layers=False)
    return config


def analyze_graph(gm: fx.GraphModule, capture_method: str, config, *, model: Optional[nn.Module] = None,
                  example_inputs=None, parameters: Optional[Dict[str, torch.Tensor]] = None,
                  sources: Optional[Dict[str, str]] = None) -> Plan:
    """The plan of an already captured graph (``capture_method``: symbolic_trace, export, dynamo)."""
    plan = Plan(layers=[], capture=capture_method, gm=gm, model=model,
                example_inputs=tuple(example_inputs) if example_inputs is not None else None,
                parameters=dict(parameters or {}), sources=dict(sources or {}))
    # the code for readers of the plan (report, inspect_model, a sasified model's sas_plan); the
    # torch.compile backend skips it: generating it costs 50 ms on ResNet-50, 15% of a capture
    plan.graph_before = gm.code
    return run_passes(ANALYSIS, gm, plan, config)


def analyze_model(model: nn.Module, example_inputs, config, *, dynamo_fallback: bool = False) -> Plan:
    """Capture ``model`` (symbolic_trace, else torch.export) and run the analysis.

    Raises :class:`CaptureError` when neither capture works. With ``dynamo_fallback`` (and
    example inputs) a model with data-dependent control flow is captured by dynamo instead,
    one graph per piece between graph breaks, and analysed graph by graph into one plan
    (``capture="dynamo"``, ``graph_breaks`` listed). Its conversions are module swaps: a layer
    converts only where a stock ``nn.Linear``/``nn.Conv`` module's own forward made the call and
    nothing else in any graph reads its weight (:func:`_module_swap_conflicts`), so that
    ``sasify`` can apply it to a copy of the model, whatever code runs between the graphs.
    :func:`module_plan` is the graph-less fallback a caller may choose instead.
    """
    try:
        captured = capture(model, example_inputs)
    except CaptureError as error:
        if not dynamo_fallback or example_inputs is None:
            raise
        return _analyze_dynamo_graphs(model, example_inputs, config, error)
    plan = analyze_graph(captured.gm, captured.method, config, model=model, example_inputs=captured.example_inputs)
    if captured.method == "symbolic_trace" and not is_module_swap(plan):
        _check_one_graph(plan)
    return plan


def _check_one_graph(plan: Plan) -> None:
    """A plan whose rewrite is a graph (not module swaps) of a symbolic trace: the mode-dependent
    values the trace took as constants are bound (``plan.mode_bindings``, read at run time by the
    rewritten graph); where no one graph is the model (a branch on the mode or the grad mode,
    checkpointing: :func:`~passes.mode_flags.trace_modes`), the plan keeps to module swaps and
    ``plan.not_one_graph`` says why and what that leaves."""
    if plan.model is None:
        return
    modes = trace_modes(plan.gm, plan.model)
    why = modes.why
    if why is None and modes.checkpointed:
        where = ", ".join(path or "the root" for path in modes.checkpointed)
        why = (f"its forward calls torch.utils.checkpoint (in {where}), which a traced graph inlines, keeping "
               "every activation it frees")
    if why is None:
        plan.mode_bindings = modes.bindings
    else:
        plan.not_one_graph = keep_module_swaps(plan, why)


def _analyze_dynamo_graphs(model: nn.Module, example_inputs, config, error: CaptureError) -> Plan:
    graphs, breaks = capture_with_dynamo(model, example_inputs)
    layers, code, foreign = [], [], {}
    for index, graph in enumerate(graphs):
        graph_config = config_for_graph(config, resumes=graph.resumes)
        plan = analyze_graph(graph.gm, "dynamo", graph_config, model=model, example_inputs=graph.example_inputs,
                             parameters=graph.parameters, sources=graph.sources)
        for key, uses in _other_parameter_reads(graph, plan, f"graph {index + 1}").items():
            foreign.setdefault(key, []).extend(uses)
        for layer in plan.layers:
            layer.call = None  # the graphs are not kept: the plan is for reading and module swaps
            if graph.resumes:
                layer.input_is_graph_input = False  # its graph's inputs are activations
        layers += plan.layers
        code.append(f"# graph {index + 1} of {len(graphs)}\n{graph.gm.code}")
    _module_swap_conflicts(layers, model, foreign)
    not_in_graphs = _layer_modules_not_in_graphs(layers, model, graphs, foreign)
    breaks = breaks or [f"{len(graphs)} graph{'s' if len(graphs) != 1 else ''}, no graph break"]
    plan = Plan(layers=layers, capture="dynamo", model=model, capture_error=error, graph_breaks=breaks,
                not_in_graphs=not_in_graphs)
    plan.graph_before = "\n".join(code)
    return plan


def _other_parameter_reads(graph, plan: Plan, where: str) -> Dict[int, list]:
    """``id(parameter) -> [what reads it]`` in one dynamo graph, besides the conv/linear call sites
    that take it as their weight or bias."""
    sites = {layer.node: layer for layer in plan.layers if layer.call is not None}
    # a matmul's transpose of its weight (x @ W.T) is part of its call site
    sites.update({layer.call.weight_view.name: layer for layer in sites.values()
                  if getattr(layer.call, "weight_view", None) is not None})
    reads: Dict[int, list] = {}
    for node in graph.gm.graph.nodes:
        tensor = graph.parameters.get(node.name) if node.op == "placeholder" else None
        if tensor is None:
            continue
        for user in node.users:
            site = sites.get(user.name)
            if site is None or node not in (site.call.weight, site.call.bias):
                reads.setdefault(id(tensor), []).append(f"{user.name} in {where}")
    return reads


def _module_swap_conflicts(layers, model: nn.Module, foreign: Dict[int, list]) -> None:
    """Keep dense, across every graph, what a module swap would change elsewhere.

    A swapped module's weight becomes the wide one everywhere the model reads it, and the swap
    changes every call of the module. So a layer stays dense when some other op of any graph
    reads its weight, when another call of its module stays dense, or when another holder of its
    weight (a tied module) is not swapped with it; repeated until nothing changes, as each
    layer kept dense can keep a tied partner dense.
    """
    holders: Dict[int, list] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), []).append((path, mod, pname))
    changed = True
    while changed:
        changed = False
        swapped = {id(model.get_submodule(layer.module_target)) for layer in layers
                   if layer.eligible and layer.module_target is not None}
        dense: Dict[str, str] = {}
        for layer in layers:
            if not layer.eligible:
                dense.setdefault(layer.module_target or layer.name, layer.reason)
        for layer in layers:
            if not layer.eligible or layer.module_target is None:
                continue
            weight = model.get_submodule(layer.module_target).weight
            why = None
            if foreign.get(id(weight)):
                why = (f"its weight is also read outside the layer ({', '.join(foreign[id(weight)][:3])}): "
                       "a module swap would hand that read the wide weight")
            elif layer.module_target in dense:
                why = f"another call of this module stays dense ({dense[layer.module_target]})"
            else:
                for path, mod, pname in holders.get(id(weight), []):
                    if pname != "weight" or id(mod) not in swapped:
                        why = (f"its weight is tied to {path}.{pname} ({type(mod).__name__}), which stays dense: "
                               "kept dense so that the tie holds")
                        break
            if why is not None:
                layer.eligible, layer.reason, changed = False, why, True


def _layer_modules_not_in_graphs(layers, model: nn.Module, graphs, foreign: Dict[int, list]) -> list:
    """``"path: why"`` for each Linear/Conv1d/2d/3d module of ``model`` that no captured graph calls as a
    layer: the run on the example inputs did not call it, its forward computes with other ops (a
    matmul), or other code reads its weight. Each stays dense."""
    seen = {layer.module_target or layer.name for layer in layers}
    ran_in = {clean_module_path(path) for graph in graphs for node in graph.gm.graph.nodes
              for path, _ in (node.meta.get("nn_module_stack") or {}).values()}
    lines = []
    for path, mod in model.named_modules():
        if path in seen or isinstance(mod, SAS_LAYERS) or not isinstance(mod, LAYER_MODULES):
            continue
        if foreign.get(id(mod.weight)):
            why = f"other code reads its weight ({', '.join(foreign[id(mod.weight)][:2])}), not its own forward"
        elif path in ran_in:
            why = f"its forward ({type(mod).__name__}) computes with other ops than linear/conv"
        else:
            why = "not called when the model ran on example_inputs"
        lines.append(f"{path}: {why}")
    return lines


def module_plan(model: nn.Module, config, error: CaptureError) -> Plan:
    """A plan without a graph: the layer modules in registration order (``capture="modules"``)."""
    plan = Plan(layers=layers_from_modules(model, config), capture="modules", model=model, capture_error=error)
    plan.graph_before = f"# no graph: {error}"
    return plan
