"""The user's verb: ``sas_compile.sparsify(model, config)``, one config per technique.

In torchao's shape: a technique is a small config dataclass plus a handler registered for
that config type (``SASConfig`` in ``sas_compile/sas.py``, ``SWSConfig`` in
``sas_compile/sws.py``, ``SWATConfig`` in ``sas_compile/swat.py``); adding one touches no
dispatcher. ``filter_fn(module, fqn) -> bool`` picks the layers, as in torchao. Every result
carries what was done the same way: ``model.sparsify_config`` (the config) and
``model.sparsify_plan`` (the per-layer plan: converted or why not).

``analyze(model, example_inputs)`` is the analysis alone (capture + analysis passes), the
plan ``report`` and ``inspect`` read.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Dict, Optional, Type

import torch
from torch import nn

from .passes.capture import CaptureError, bind_example_inputs
from .passes.pipeline import analyze_model
from .passes.plan import Plan

__all__ = ["sparsify", "register_handler", "analyze", "attach_result", "CaptureError", "FilterFn",
           "AnalysisOptions"]

FilterFn = Callable[[Optional[nn.Module], str], bool]
Handler = Callable[[nn.Module, Any, Any], nn.Module]
_HANDLERS: Dict[Type, Handler] = {}


def register_handler(config_type: Type) -> Callable[[Handler], Handler]:
    """Register ``handler(model, config, example_inputs) -> new model`` for ``config_type``."""

    def register(handler: Handler) -> Handler:
        _HANDLERS[config_type] = handler
        return handler

    return register


def check_filter_fn(filter_fn, what: str = "filter_fn") -> None:
    """A clear ValueError for a ``filter_fn`` that is not a callable ``(module, fqn) -> bool``
    (the same one from every entry point: sparsify, report, inspect_model)."""
    if filter_fn is not None and not callable(filter_fn):
        raise ValueError(f"{what}={filter_fn!r}: expected None or a callable (module, fqn) -> bool "
                         "that returns False for the layers to keep dense")


def check_model(model) -> None:
    """One clear error, from every entry point, for a model no conversion or analysis can take:
    not an ``nn.Module``, a TorchScript module (no Python code to capture), a wrapper that
    holds the model in ``.module`` (``DataParallel``, ``DistributedDataParallel``) or
    ``._orig_mod`` (``torch.compile``'s), or one with lazy layers whose parameters have no shape
    yet."""
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"model is a TorchScript module ({type(model).__name__}), which has no Python code to "
                        "capture: convert the nn.Module before torch.jit.script, and script the result")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(f"model is a {type(model).__name__} wrapper: pass the model it wraps (model.module), "
                        f"and wrap the result in {type(model).__name__} again")
    compiled = sys.modules.get("torch._dynamo.eval_frame")  # never imported here: it costs 0.6-0.9 s
    if compiled is not None and isinstance(model, compiled.OptimizedModule):
        raise TypeError("model is a torch.compile wrapper (OptimizedModule): pass the model it compiles "
                        "(model._orig_mod) and torch.compile the result, or compile the dense model with "
                        "torch.compile(model, backend='sas'), which converts it as it compiles")
    lazy = [name or type(model).__name__ for name, mod in model.named_modules()
            if isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params()]
    if lazy:
        raise ValueError(f"lazy layers without shapes yet ({', '.join(lazy[:4])}"
                         f"{', ...' if len(lazy) > 4 else ''}): run the model once on an example input, "
                         "which gives their parameters shapes, then convert it")


def sparsify(model: nn.Module, config, *, filter_fn: Optional[FilterFn] = None, example_inputs=None) -> nn.Module:
    """Return a converted copy of ``model`` as ``config`` says; ``model`` is not modified.

    ``config``: ``SASConfig`` (function-preserving SAS layers), ``SWSConfig`` (the sqrt(M)-wide
    1:M-sparse baseline) or ``SWATConfig`` (sparse-weight-and-activation training).
    ``filter_fn(module, fqn) -> bool`` keeps the layers for which it returns False as they
    are (it replaces ``config.filter_fn`` when given). ``example_inputs`` (a tensor, a tuple of
    positional inputs, or a dict of keyword inputs bound to ``model.forward`` by name) gives
    exact shapes and lets models that symbolic tracing cannot capture be captured with
    torch.export.
    """
    check_model(model)
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(sorted(t.__name__ for t in _HANDLERS)) or "none registered"
        raise TypeError(f"config must be one of the sparsify configs ({known}), got {type(config).__name__}")
    check_filter_fn(filter_fn)
    if filter_fn is not None:
        config = dataclasses.replace(config, filter_fn=filter_fn)
    return handler(model, config, bind_example_inputs(model, example_inputs))


def attach_result(model: nn.Module, config, plan: Plan) -> nn.Module:
    """Record on a converted model what was done: ``sparsify_config`` and ``sparsify_plan``."""
    model.sparsify_config = config
    model.sparsify_plan = plan
    return model


@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
    """What the analysis reads: the layer filter and the input-layer and ReLU-fold policies."""

    filter_fn: Optional[FilterFn] = None
    dense_input_layers: bool = True
    fold_relu: bool = True


def analyze(model: nn.Module, example_inputs=None, *, filter_fn: Optional[FilterFn] = None,
            dense_input_layers: bool = True, fold_relu: bool = True, dynamo_fallback: bool = False) -> Plan:
    """Capture ``model`` and decide, per conv/linear call, whether it can become SAS and why not.

    The plan does not depend on M. Raises :class:`CaptureError` when the model cannot be
    captured (without ``example_inputs`` only symbolic tracing is tried), unless
    ``dynamo_fallback``: then a model neither symbolic tracing nor torch.export captures whole
    (data-dependent control flow, a cache object in its output) is captured by dynamo, graph by
    graph, into one plan listing the graph breaks, whose conversions are module swaps.
    """
    check_model(model)
    check_filter_fn(filter_fn)
    return analyze_model(model, example_inputs, AnalysisOptions(filter_fn, bool(dense_input_layers), bool(fold_relu)),
                         dynamo_fallback=dynamo_fallback)
