"""sas-compile: Structured Activation Sparsification (SAS) as a PyTorch compiler.

The public API is small:

- :func:`sasify` turns a model into a function-preserving SAS model (wide weights, sparse
  projected activations) that can be trained and compiled;
- :func:`swsify` builds the paper's baseline: a sqrt(M)-wide network with 1:M sparse weights;
- :func:`swatify` makes a model train with sparse weights and activations (SWAT);
- :func:`report` counts mults and parameters for base, SAS and SWS; :func:`inspect` shows the
  per-layer plan and the graph before and after the rewrite;
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
    "sasify": "sas_compile.api",
    "SASConfig": "sas_compile.api",
    "swsify": "sas_compile.sws",
    "swatify": "sas_compile.swat",
    "report": "sas_compile.report",
    "Report": "sas_compile.report",
    "inspect": "sas_compile.inspection",
    "Plan": "sas_compile.plan",
    "LayerPlan": "sas_compile.plan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sas_compile' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
