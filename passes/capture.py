"""Capture a model as an FX graph: ``symbolic_trace`` first, ``torch.export`` when it fails.

Why two ways: symbolic tracing keeps the user's module structure (the rewrite can swap
modules and re-wire a ReLU's consumers) but stops at data-dependent Python; ``torch.export``
(non-strict, fake tensors) captures most real architectures (``transformers`` models) given
example inputs. A model neither can capture gets an error naming the code that broke
tracing and pointing to ``torch.compile(model, backend="sas")``, which handles graph breaks.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import fx, nn

log = logging.getLogger("sas_compile.passes")

__all__ = ["Captured", "CaptureError", "capture", "normalize_example_inputs", "SASTracer"]


class CaptureError(RuntimeError):
    """Neither symbolic tracing nor torch.export could capture the model."""


@dataclass
class Captured:
    gm: fx.GraphModule
    method: str  # "symbolic_trace" | "export"
    example_inputs: Optional[Tuple[Any, ...]]
    trace_error: Optional[str] = None


class SASTracer(fx.Tracer):
    """Symbolic tracer that also keeps sas-compile's own layers as leaf modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from sas_compile.runtime.layers import SAS_LAYERS

        return isinstance(m, SAS_LAYERS) or getattr(m, "_sas_compile_leaf", False) or super().is_leaf_module(m, qualname)


def normalize_example_inputs(example_inputs) -> Optional[Tuple[Any, ...]]:
    """``None``, a tensor, or a tuple/list of positional inputs -> a tuple (or None)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    tracer = SASTracer()
    graph = tracer.trace(model)
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def _user_frame(err: BaseException) -> str:
    """The innermost traceback frame outside torch: the user's code that broke tracing."""
    tb = err.__traceback__
    where = ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if "/torch/" not in filename and "sas_compile" not in filename and "/passes/" not in filename:
            where = f"{filename}:{tb.tb_lineno} in {tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    return where


def _propagate_shapes(gm: fx.GraphModule, example_inputs) -> None:
    """Shapes on every node, computed on fake tensors: the user's model (BatchNorm statistics
    included) is never run for real."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)


def capture(model: nn.Module, example_inputs=None, *, allow_export: bool = True) -> Captured:
    """Capture ``model`` (traced as it is: callers pass a copy if they rewrite it)."""
    example_inputs = normalize_example_inputs(example_inputs)
    try:
        gm = _symbolic_trace(model)
        if example_inputs is not None:
            _propagate_shapes(gm, example_inputs)
        return Captured(gm, "symbolic_trace", example_inputs)
    except Exception as err:  # noqa: BLE001 - any tracing failure moves on to export
        trace_error = f"{_first_line(err)}" + (f" (at {_user_frame(err)})" if _user_frame(err) else "")
        log.debug("symbolic_trace failed for %s: %s", type(model).__name__, trace_error)
    if not allow_export or example_inputs is None:
        raise CaptureError(
            f"torch.fx.symbolic_trace cannot trace {type(model).__name__}: {trace_error}. "
            "Pass example_inputs so that sas-compile can capture it with torch.export, or use "
            "torch.compile(model, backend='sas'), which handles data-dependent code with graph breaks."
        )
    try:
        with torch.no_grad():
            ep = torch.export.export(model, example_inputs, strict=False)
        gm = ep.module()
    except Exception as err:  # noqa: BLE001
        where = _user_frame(err)
        raise CaptureError(
            f"sas-compile cannot capture {type(model).__name__} as one graph: symbolic tracing failed "
            f"({trace_error}) and torch.export failed ({_first_line(err)}"
            + (f", at {where}" if where else "")
            + "). Data-dependent control flow cannot be rewritten ahead of time: use "
            "torch.compile(model, backend='sas'), which converts every captured graph around the "
            "graph breaks."
        ) from err
    return Captured(gm, "export", example_inputs, trace_error)


def clean_module_path(path: str) -> str:
    """``L['self'].layer1[0].conv1`` / ``L['s']._modules['fc']._parameters['weight']`` -> ``layer1.0.conv1`` / ``fc.weight``."""
    path = re.sub(r"^L\['[^']+'\]", "", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    parts = [p for p in path.split(".") if p and p not in ("_modules", "_parameters", "_buffers")]
    return ".".join(parts)
