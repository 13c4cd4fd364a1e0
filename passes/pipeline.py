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

from .capture import CaptureError, capture, capture_with_dynamo
from .find_foldable_relus import find_foldable_relus
from .find_sas_layers import find_sas_layers, layers_from_modules
from .lower_sas_to_projection import lower_sas_to_projection
from .plan import Plan
from .rewrite_layers_to_sas import rewrite_layers_to_sas

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
    (``capture="dynamo"``, ``graph_breaks`` listed); that plan can be read (report, inspect),
    not applied. :func:`module_plan` is the graph-less fallback a caller may choose instead.
    """
    try:
        captured = capture(model, example_inputs)
    except CaptureError as error:
        if not dynamo_fallback or example_inputs is None:
            raise
        return _analyze_dynamo_graphs(model, example_inputs, config, error)
    return analyze_graph(captured.gm, captured.method, config, model=model, example_inputs=captured.example_inputs)


def _analyze_dynamo_graphs(model: nn.Module, example_inputs, config, error: CaptureError) -> Plan:
    graphs, breaks = capture_with_dynamo(model, example_inputs)
    layers, code = [], []
    for index, graph in enumerate(graphs):
        graph_config = config_for_graph(config, resumes=graph.resumes)
        plan = analyze_graph(graph.gm, "dynamo", graph_config, model=model, example_inputs=graph.example_inputs,
                             parameters=graph.parameters, sources=graph.sources)
        for layer in plan.layers:
            layer.call = None  # the graphs are not kept: the plan is for reading
            if graph.resumes:
                layer.input_is_graph_input = False  # its graph's inputs are activations
        layers += plan.layers
        code.append(f"# graph {index + 1} of {len(graphs)}\n{graph.gm.code}")
    plan = Plan(layers=layers, capture="dynamo", model=model, capture_error=error,
                graph_breaks=breaks or [f"{len(graphs)} graphs"])
    plan.graph_before = "\n".join(code)
    return plan


def module_plan(model: nn.Module, config, error: CaptureError) -> Plan:
    """A plan without a graph: the layer modules in registration order (``capture="modules"``)."""
    plan = Plan(layers=layers_from_modules(model, config), capture="modules", model=model, capture_error=error)
    plan.graph_before = f"# no graph: {error}"
    return plan
