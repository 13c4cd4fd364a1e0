"""SAS / SWS ops and their implementations per target (cpu, cuda, emulator).

``sas_matmul`` / ``sws_matmul`` are the GEMM entry points, ``targets()`` says what this
machine can run. Importing this package registers the ``sas::`` torch ops.
"""
from __future__ import annotations

import importlib
import importlib.util

_EXPORTS = {
    "project": "sas_compile.runtime.projection",
    "slot_index": "sas_compile.runtime.projection",
    "get_rule": "sas_compile.runtime.projection",
    "register_rule": "sas_compile.runtime.projection",
    "sas_matmul": "sas_compile.runtime.matmul",
    "sws_matmul": "sas_compile.runtime.matmul",
    "targets": "sas_compile.runtime.matmul",
    "PackedSparseWeight": "sas_compile.runtime.packing",
    "pack_sws_weight": "sas_compile.runtime.packing",
    "unpack_sws_weight": "sas_compile.runtime.packing",
    "pack_sas_activation_cutlass": "sas_compile.runtime.packing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    # submodules are attributes too (``sas_compile.runtime.autotune.explain()`` after ``import sas_compile``)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'sas_compile.runtime' has no attribute {name!r}")
