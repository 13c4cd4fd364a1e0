"""The ``"sas"`` dynamo backend: ``torch.compile(model, backend="sas", options={...})``.

Registered through the ``torch_dynamo_backends`` entry point, so a fresh process that never
imported ``sas_compile`` finds it. Every captured graph (graph breaks included) goes through
the same passes as ``sasify``: find_sas_layers -> fold_relu_into_projection ->
rewrite_layers_to_sas; the ``sas::`` ops of an already-sasified model are kept as they are.
The rest of the graph is compiled by inductor (``options={"inner": "eager"}`` skips it).
On a GPU, SAS layers whose fastest implementation is projection + cuBLAS/cuDNN are written
out as those aten ops (``lower_sas_to_projection``), so inductor fuses the projection with
the ops around it.

Options: ``M`` (2), ``filter_fn``, ``dense_input_layers`` (True), ``fold_relu`` (True),
``inner`` ("inductor" | "eager" | "aot_eager"), ``explain`` (False: print, per graph,
which layers converted and which stayed dense and why).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch
from torch import fx

from .api import SASConfig
from .passes.find_sas_layers import find_sas_layers
from .passes.fold_relu_into_projection import fold_relu_into_projection
from .passes.lower_sas_to_projection import lower_sas_to_projection
from .passes.rewrite_layers_to_sas import rewrite_layers_to_sas

log = logging.getLogger("sas_compile.backend")

__all__ = ["sas_backend", "SASTrainingError", "OPTIONS"]

OPTIONS = ("M", "filter_fn", "dense_input_layers", "fold_relu", "inner", "explain")


class SASTrainingError(RuntimeError):
    """The compiled model is being trained but its dense weights cannot become SAS parameters."""


def _placeholder_sources(gm: fx.GraphModule) -> Dict[str, str]:
    """Placeholder name -> the parameter's path in the user's model, from dynamo's metadata."""
    from .passes.capture import clean_module_path

    sources = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        name = getattr(source, "name", None)
        name = name() if callable(name) else name
        if isinstance(name, str):
            sources[node.name] = clean_module_path(name)
    return sources


def _explain(plan, graph_index: int) -> str:
    lines = [f"[sas] graph {graph_index}: M={plan.M}, {len(plan.eligible())} of {len(plan.layers)} conv/linear layers converted"]
    for layer in plan.layers:
        if layer.eligible:
            fold = " (ReLU folded into the projection)" if layer.fold_relu else ""
            lines.append(f"[sas]   converted  {layer.name} ({layer.op}){fold}")
        else:
            lines.append(f"[sas]   dense      {layer.name} ({layer.op}): {layer.reason}")
    return "\n".join(lines)


_graph_counter = [0]


def _graph_device(example_inputs: List[Any]) -> Optional[torch.device]:
    """The device the graph runs on: the first tensor input's."""
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _in_resume_frame() -> bool:
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx().f_code.co_name.startswith("torch_dynamo_resume_in_")
    except Exception:  # noqa: BLE001 - outside dynamo (a direct call): treat inputs as network inputs
        return False


def sas_backend(gm: fx.GraphModule, example_inputs: List[Any], options: Optional[Dict[str, Any]] = None, **kwargs):
    """Dynamo backend: rewrite the eligible layers of one captured graph into SAS ops, then compile."""
    options = dict(options or {})
    options.update(kwargs)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown sas backend option(s) {unknown}; known options: {list(OPTIONS)}")
    config = SASConfig(M=options.get("M", 2), filter_fn=options.get("filter_fn"),
                       dense_input_layers=options.get("dense_input_layers", True),
                       fold_relu=options.get("fold_relu", True))
    inner = options.get("inner", "inductor")
    if inner not in ("inductor", "eager", "aot_eager"):
        raise ValueError(f"option inner={inner!r}: expected 'inductor', 'eager' or 'aot_eager'")

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = {node.name: value for node, value in zip(placeholders, example_inputs)
              if isinstance(value, torch.nn.Parameter)}
    # after a graph break the graph's inputs are activations, not the network's input
    dense_inputs = config.dense_input_layers and not _in_resume_frame()
    plan = find_sas_layers(gm, M=config.M, capture="dynamo", filter_fn=config.filter_fn,
                           dense_input_layers=dense_inputs, placeholder_values=values,
                           placeholder_sources=_placeholder_sources(gm))
    if config.fold_relu:
        fold_relu_into_projection(plan, gm)
    eligible = plan.eligible()
    if eligible and torch.is_grad_enabled():
        trained = [layer.name for layer in eligible if values[layer.weight_target].requires_grad]
        if trained:
            raise SASTrainingError(
                f"torch.compile(backend='sas') would train dense layers {trained[:4]}"
                f"{' ...' if len(trained) > 4 else ''} through wide SAS weights that are not parameters of "
                "your model. Call model = sas_compile.sasify(model, M=...) first and train that model "
                "(compiling it with backend='sas' keeps its SAS layers), or run inference under "
                "torch.no_grad() / torch.inference_mode()."
            )
    _graph_counter[0] += 1
    if options.get("explain", False):
        print(_explain(plan, _graph_counter[0]))
    log.info("%s", _explain(plan, _graph_counter[0]))
    if eligible:
        rewrite_layers_to_sas(gm, plan)
    device = _graph_device(example_inputs)
    if device is not None:
        lower_sas_to_projection(gm, device)
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
