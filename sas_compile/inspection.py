"""``sas_compile.inspect_model(model, example_inputs)``: the per-layer plan, readable, and the graph.

Why: before training anything, users want to see which layers convert, which stay dense
and why, whether a ReLU folds into a projection, what each layer costs before and after,
and the captured graph before and after the rewrite. This runs the analysis and the SAS
rewrite of ``passes/pipeline.py`` on a copy and returns the plan, whose text, dict and
Graphviz forms are defined with it (``passes/plan.py``); it never decides eligibility.

Render the DOT text to SVG with :func:`render_svg` (needs the ``graphviz`` Python package
and the Graphviz ``dot`` program: ``pip install graphviz`` and ``apt install graphviz``),
or with ``dot -Tsvg plan.dot -o plan.svg``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from torch import nn

from .api import check_model
from .passes.capture import CaptureError, bind_example_inputs
from .passes.pipeline import analyze_model, module_plan
from .passes.plan import Plan, layer_cost_summary, render_svg
from .sas import SASConfig, apply_sas_plan

log = logging.getLogger("sas_compile.inspection")

__all__ = ["inspect_model", "layer_cost_summary", "render_svg"]


def inspect_model(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    M: int = 2,
    filter_fn: Optional[Callable[[Optional[nn.Module], str], bool]] = None,
    dense_input_layers: bool = True,
    symbolic: bool = True,
) -> Plan:
    """Analyse ``model``, run the SAS rewrite at ``M`` on a copy, and return the plan.

    ``str(plan)`` lists every conv/linear layer with its shapes, eligibility and reason,
    ReLU folding and mults/params before and after; ``plan.to_dict()``, ``plan.to_dot()``
    (Graphviz DOT, converted layers highlighted) and ``plan.graph_before`` /
    ``plan.graph_after`` (FX code) give the rest. ``model`` is not modified. A model that neither
    symbolic tracing nor torch.export captures whole (data-dependent control flow, a cache object
    in its output) is captured by dynamo, graph by graph (breaks listed in ``plan.graph_breaks``),
    and converted as ``sasify`` converts it, by module swaps; one that symbolic tracing cannot
    capture and that comes without ``example_inputs`` is shown from its layer modules (no graph).
    """
    check_model(model)
    config = SASConfig(M=M, filter_fn=filter_fn, dense_input_layers=dense_input_layers)
    example_inputs = bind_example_inputs(model, example_inputs)
    try:
        plan = analyze_model(model, example_inputs, config, dynamo_fallback=True)
    except CaptureError as error:
        if example_inputs is not None:
            raise
        plan = module_plan(model, config, error)
    if example_inputs is not None and symbolic and plan.gm is not None:
        from .passes.propagate_symbolic_shapes import try_propagate_symbolic_shapes

        _, why = try_propagate_symbolic_shapes(plan, example_inputs)
        if why is not None:
            log.info("inspect_model: symbolic shapes unavailable: %s", why)
    if plan.capture in ("symbolic_trace", "export", "dynamo") and plan.eligible():
        apply_sas_plan(plan, config, weights_on_meta=True)
    elif plan.graph_after is None:
        plan.graph_after = plan.graph_before
    plan.M = M
    return plan
