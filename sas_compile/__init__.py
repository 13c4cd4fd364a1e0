"""sas-compile: Structured Activation Sparsification (SAS) as a PyTorch compiler.

The public API is small: :func:`sparsify` with a config (``SASConfig``, ``SWSConfig``,
``SWATConfig``), and one thin function per technique:

- :func:`sasify` turns a model into a function-preserving SAS model (wide weights, sparse
  projected activations) that can be trained and compiled;
- :func:`swsify` builds the paper's baseline: a sqrt(M)-wide network with 1:M sparse weights;
- :func:`swatify` makes a model train with sparse weights and activations (SWAT);
- :func:`report` counts mults and parameters for base, SAS and SWS; :func:`inspect_model` shows
  the per-layer plan and the graph before and after the rewrite;
- ``torch.compile(model, backend="sas")`` rewrites and lowers inside dynamo.
"""
from __future__ import annotations

import importlib
import os as _os

__version__ = "0.1.0"

# In a source checkout that was not installed, passes/ and runtime/ sit beside this folder:
# let `sas_compile.passes` and `sas_compile.runtime` resolve there too.
_here = _os.path.dirname(_os.path.abspath(__file__))
if not _os.path.isdir(_os.path.join(_here, "passes")):
    _root = _os.path.dirname(_here)
    if _os.path.isfile(_os.path.join(_root, "passes", "__init__.py")) and _root not in __path__:
        __path__.append(_root)

_EXPORTS = {
    "sparsify": "sas_compile.api",
    "analyze": "sas_compile.api",
    "SASConfig": "sas_compile.sas",
    "sasify": "sas_compile.sas",
    "SWSConfig": "sas_compile.sws",
    "swsify": "sas_compile.sws",
    "SWATConfig": "sas_compile.swat",
    "swatify": "sas_compile.swat",
    "report": "sas_compile.reporting",
    "Report": "sas_compile.report_table",
    "inspect_model": "sas_compile.inspection",
    "Plan": "sas_compile.passes.plan",
    "LayerPlan": "sas_compile.passes.plan",
}
# submodules reachable as attributes after `import sas_compile` (README names them)
_SUBMODULES = ("accounting", "api", "backend", "cli", "inspection", "layers", "models", "passes", "plan",
               "report_table", "reporting", "runtime", "sas", "sws", "swat")

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"sas_compile.{name}")
    raise AttributeError(f"module 'sas_compile' has no attribute {name!r}")
