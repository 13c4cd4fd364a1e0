"""The ``"sas"`` dynamo backend: ``torch.compile(model, backend="sas", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so a fresh process that never
imported ``sas_compile`` finds it. Every captured graph (graph breaks included) runs the
passes of ``passes/pipeline.py``: the analysis, the SAS rewrite and, on a GPU, the lowering
of layers whose fastest implementation is projection + cuBLAS/cuDNN to those aten ops (so
inductor fuses the projection with the ops around it). The ``sas::`` ops of an
already-sasified model are kept. The rest of the graph goes to the inner compiler.

Options are the fields of :class:`sas_compile.SASConfig` (``M``, ``rule``, ``filter_fn``,
``dense_input_layers``, ``fold_relu``, ``inner``, ``mode``, ``explain``, ``train_dense``);
torch.compile's own ``mode=`` reaches inductor. A dense model's layers compute from its dense
weights (expanded once per weight version); inference needs no ``no_grad``, and a backward
through them raises :class:`SASTrainingError` (saying how to proceed) unless ``train_dense``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional

import torch
from torch import fx

from .passes.capture import dynamo_placeholder_sources, in_resume_frame
from .passes.pipeline import ANALYSIS, GPU_LOWERING, SAS_REWRITE, config_for_graph, run_passes
from .passes.plan import Plan
from .runtime.sas_ops import SASTrainingError
from .sas import SASConfig

log = logging.getLogger("sas_compile.backend")

__all__ = ["sas_backend", "SASTrainingError", "OPTIONS"]

OPTIONS = tuple(f.name for f in dataclasses.fields(SASConfig))


def _explain(plan: Plan, M: int, graph_index: int) -> str:
    lines = [f"[sas] graph {graph_index}: M={M}, {len(plan.eligible())} of {len(plan.layers)} conv/linear layers converted"]
    for layer in plan.layers:
        if layer.eligible:
            fold = " (ReLU folded into the projection)" if layer.fold_relu else ""
            lines.append(f"[sas]   converted  {layer.name} ({layer.op}){fold}")
        else:
            lines.append(f"[sas]   dense      {layer.name} ({layer.op}): {layer.reason}")
    if plan.lowered:
        lines.append(f"[sas]   {plan.lowered} SAS layers written as projection + dense ops for the GPU")
    return "\n".join(lines)


_graph_counter = [0]


def _config(options: Dict[str, Any]) -> SASConfig:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown sas backend option(s) {unknown}; known options: {list(OPTIONS)}")
    return SASConfig(**options)


def _inner_compile(gm: fx.GraphModule, example_inputs: List[Any], config: SASConfig):
    if config.inner == "eager":
        return gm.forward
    if config.inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    if config.mode in (None, "default"):
        return compile_fx(gm, example_inputs)
    from torch._inductor import list_mode_options

    return compile_fx(gm, example_inputs, config_patches=list_mode_options(config.mode))


def sas_backend(gm: fx.GraphModule, example_inputs: List[Any], options: Optional[Dict[str, Any]] = None, **kwargs):
    """Dynamo backend: rewrite the eligible layers of one captured graph into SAS ops, then compile."""
    options = dict(options or {})
    options.update(kwargs)
    config = _config(options)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    parameters = {node.name: value for node, value in zip(placeholders, example_inputs)
                  if isinstance(value, torch.nn.Parameter)}
    analysis_config = config_for_graph(config, resumes=in_resume_frame())
    plan = Plan(layers=[], capture="dynamo", gm=gm, example_inputs=tuple(example_inputs), parameters=parameters,
                sources=dynamo_placeholder_sources(gm))
    plan = run_passes(ANALYSIS, gm, plan, analysis_config)
    eligible = plan.eligible()
    if eligible:
        plan = run_passes(SAS_REWRITE, gm, plan, config)
    plan = run_passes(GPU_LOWERING, gm, plan, config)
    _graph_counter[0] += 1
    text = _explain(plan, config.M, _graph_counter[0])
    if config.explain:
        print(text)
    log.info("%s", text)
    return _inner_compile(gm, example_inputs, config)
