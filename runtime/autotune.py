"""Choosing, once per shape, the fastest correct implementation of a sparse layer on a GPU.

Why this module exists: a user must never be worse off with ``target="auto"`` than with the
plain PyTorch formulation. Where the Sparse Tensor Core kernels are slower than cuBLAS or
cuDNN on the wide shape (measured on an H200: the fused SAS kernel 3.1 ms against 1.15 ms
for projection + cuBLAS), the PyTorch formulation must run. So for each operation, device,
dtype, M and shape bucket, every eligible implementation is run once on the real operands,
its output compared with the PyTorch formulation's (an implementation that disagrees is
rejected), and timed; the fastest is cached in memory and on disk, keyed like the NVRTC
cubin cache (kernel sources, device, torch and CUDA versions).

* ``SAS_COMPILE_GEMM=<impl>`` forces an implementation wherever it is eligible (for example
  ``dense``, ``fused``, ``sparse24``, ``kernel``); the decision says so.
* ``SAS_COMPILE_AUTOTUNE=0`` turns timing off: the PyTorch formulation runs unless forced.
* While a CUDA graph is being captured nothing is timed: a cached decision or the PyTorch
  formulation runs.

Every decision is logged on logger ``sas_compile.runtime`` and listed by :func:`explain`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

import torch
from torch import Tensor

__all__ = ["Decision", "Autotuner", "choose", "explain", "decisions", "default_tuner", "ENV_FORCE",
           "ENV_AUTOTUNE", "REFERENCE", "time_ms"]

logger = logging.getLogger("sas_compile.runtime")

ENV_FORCE = "SAS_COMPILE_GEMM"
ENV_AUTOTUNE = "SAS_COMPILE_AUTOTUNE"
REFERENCE = "dense"  # the PyTorch formulation: always a candidate, the reference of the check
_CACHE_VERSION = 1
# norm-relative disagreement with the PyTorch formulation that rejects an implementation:
# far above rounding (tf32 ~3e-4, fp16 ~1e-3, bf16 ~8e-3), far below any layout mistake (O(1))
_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float32: 1e-2}

Timer = Callable[[str, Callable[[], object], str], float]  # (name, fn, device type) -> ms


@dataclass
class Decision:
    """Which implementation runs for one operation and shape bucket, and why."""

    op: str
    fields: Dict[str, object]
    impl: str
    how: str
    times_ms: Dict[str, float] = field(default_factory=dict)
    rejected: Dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        shape = ", ".join(f"{k}={v}" for k, v in self.fields.items())
        times = ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(self.times_ms.items(), key=lambda kv: kv[1]))
        out = f"{self.op}({shape}): {self.impl} [{self.how}]"
        if times:
            out += f"; times: {times}"
        if self.rejected:
            out += "; not used: " + "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        return out


def time_ms(fn: Callable[[], object], device_type: str, warmup: int = 2, repeats: int = 5) -> List[float]:
    """Milliseconds of ``repeats`` calls of ``fn()`` after ``warmup`` (CUDA events on a GPU, the
    wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device_type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1e3)
    return samples


def _device_timer(name: str, fn: Callable[[], object], device_type: str, warmup: int = 2, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()``."""
    return statistics.median(time_ms(fn, device_type, warmup, repeats))


def _environment(device: torch.device) -> Dict[str, str]:
    """What a cached decision depends on besides the shape: device, versions, kernel sources."""
    from .cuda.nvrtc_build import source_hash

    env = {"torch": torch.__version__, "cuda": str(torch.version.cuda), "kernels": source_hash()[:16]}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
    else:
        env["device"] = device.type
    return env


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _rel_err(out: Tensor, ref: Tensor) -> float:
    ref64 = ref.double()
    denom = ref64.norm().item()
    if not torch.isfinite(out).all() and torch.isfinite(ref).all():
        return float("inf")
    return (out.double() - ref64).norm().item() / (denom or 1.0)


class Autotuner:
    """Measures candidates once per key and remembers the choice (memory and disk).

    ``path``: the JSON file of decisions (default: ``<cache dir>/autotune-v1.json``);
    ``persist=False`` keeps decisions in memory only. ``timer(name, fn, device_type)``
    returns the milliseconds of ``fn()`` (tests pass a fake one).
    """

    def __init__(self, path: Optional[Path] = None, timer: Optional[Timer] = None, persist: bool = True):
        self._path = path
        self._timer = timer or _device_timer
        self._persist = persist
        self._lock = threading.Lock()
        self._memory: Dict[tuple, Decision] = {}
        self._disk: Optional[Dict[str, dict]] = None
        self._log: List[Decision] = []

    @property
    def path(self) -> Path:
        if self._path is None:
            from .cuda.nvrtc_build import cache_dir

            self._path = cache_dir() / f"autotune-v{_CACHE_VERSION}.json"
        return self._path

    def _load_disk(self) -> Dict[str, dict]:
        if self._disk is None:
            self._disk = {}
            if self._persist and self.path.exists():
                try:
                    self._disk = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    logger.warning("autotune cache %s is unreadable; measuring again", self.path)
        return self._disk

    def _store_disk(self, key: str, decision: Decision) -> None:
        if not self._persist:
            return
        entry = {"op": decision.op, "fields": decision.fields, "impl": decision.impl, "times_ms": decision.times_ms}
        try:
            current = json.loads(self.path.read_text()) if self.path.exists() else {}
        except (OSError, ValueError):
            current = {}
        current[key] = entry
        self._disk = current
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                json.dump(current, handle, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as error:  # a read-only cache costs a re-measurement next process, nothing more
            logger.warning("could not write the autotune cache %s: %s", self.path, error)

    def _remember(self, key: tuple, decision: Decision) -> Decision:
        self._memory[key] = decision
        self._log.append(decision)
        logger.info("autotune: %s", decision.describe())
        return decision

    def choose(self, op: str, fields: Mapping[str, object], candidates: Mapping[str, Callable[[], Tensor]],
               device: torch.device, rejected: Optional[Mapping[str, str]] = None) -> Decision:
        """The implementation to run for ``op`` at ``fields``; ``candidates[REFERENCE]`` must exist.

        ``candidates``: name -> a call computing the product on the real operands.
        ``rejected``: implementations not eligible here, with the reason (shown by explain).
        """
        if REFERENCE not in candidates:
            raise ValueError(f"autotune: the candidates of {op} must include {REFERENCE!r}")
        fields = dict(fields)
        rejected = dict(rejected or {})
        forced = os.environ.get(ENV_FORCE, "").strip()
        # a hit in this process costs a dict lookup: the environment (versions, kernel sources)
        # does not change within a process, so it enters only the disk cache's key
        memory_key = (op, json.dumps(fields, sort_keys=True, default=str), str(device), forced)
        with self._lock:
            if memory_key in self._memory:
                return self._memory[memory_key]
            key_payload = {"op": op, "fields": fields, "env": _environment(device)}
            key = hashlib.sha256(json.dumps(key_payload, sort_keys=True, default=str).encode()).hexdigest()[:32]
            if forced in candidates:
                return self._remember(memory_key, Decision(op, fields, forced, f"forced by {ENV_FORCE}", {}, rejected))
            if forced:
                why = rejected.get(forced, "not an implementation of this operation")
                rejected[forced] = f"forced by {ENV_FORCE} but not usable here: {why}"
            cached = self._load_disk().get(key)
            if cached is not None and cached.get("impl") in candidates:
                return self._remember(memory_key, Decision(op, fields, cached["impl"], "disk cache",
                                                           dict(cached.get("times_ms", {})), rejected))
            if os.environ.get(ENV_AUTOTUNE, "1").strip().lower() in ("0", "false", "no", "off"):
                return self._remember(memory_key, Decision(op, fields, REFERENCE, f"default ({ENV_AUTOTUNE}=0)",
                                                           {}, rejected))
            if _capturing(device):
                # nothing is timed or remembered inside a CUDA graph capture
                return Decision(op, fields, REFERENCE, "default (CUDA graph capture)", {}, rejected)
            decision = self._measure(op, fields, candidates, device, rejected)
            self._store_disk(key, decision)
            return self._remember(memory_key, decision)

    def _measure(self, op, fields, candidates, device, rejected) -> Decision:
        reference = candidates[REFERENCE]()
        tolerance = _TOLERANCE.get(reference.dtype, 1e-2)
        usable: Dict[str, Callable[[], Tensor]] = {REFERENCE: candidates[REFERENCE]}
        for name, fn in candidates.items():
            if name == REFERENCE:
                continue
            try:
                out = fn()
            except Exception as error:  # noqa: BLE001 - an implementation that cannot run here is skipped
                rejected[name] = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                continue
            if out.shape != reference.shape:
                rejected[name] = f"wrong shape {tuple(out.shape)} (expected {tuple(reference.shape)})"
                continue
            error = _rel_err(out, reference)
            if not error <= tolerance:
                rejected[name] = f"disagrees with the PyTorch formulation (relative error {error:.2e})"
                continue
            usable[name] = fn
        times = {name: float(self._timer(name, fn, device.type)) for name, fn in usable.items()}
        best = min(times, key=times.get)
        return Decision(op, fields, best, "measured", times, rejected)

    def decisions(self) -> List[Decision]:
        """Every decision made in this process, in order."""
        return list(self._log)

    def explain(self) -> str:
        """One line per decision: the operation and shape, the choice, how, the times."""
        if not self._log:
            return "autotune: no decision made yet in this process"
        return "\n".join(d.describe() for d in self._log)

    def clear(self) -> None:
        """Forget the decisions of this process (the disk cache stays)."""
        with self._lock:
            self._memory.clear()
            self._log.clear()
            self._disk = None


_default: Optional[Autotuner] = None


def default_tuner() -> Autotuner:
    """The process-wide tuner the ops use."""
    global _default
    if _default is None:
        _default = Autotuner()
    return _default


def choose(op: str, fields: Mapping[str, object], candidates: Mapping[str, Callable[[], Tensor]],
           device: torch.device, rejected: Optional[Mapping[str, str]] = None) -> Decision:
    """:meth:`Autotuner.choose` on the process-wide tuner."""
    return default_tuner().choose(op, fields, candidates, device, rejected)


def decisions() -> List[Decision]:
    return default_tuner().decisions()


def explain() -> str:
    """The implementation chosen for every sparse operation and shape so far, and why."""
    return default_tuner().explain()
