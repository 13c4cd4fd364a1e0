"""Host kernels: the sign rule's projection and its input gradient, one pass each, in C.

Why: a linear layer's wide tensor (and a channels_last convolution's) holds the two slots of
each value side by side. PyTorch writes them as two strided planes: no store vectorises and
every cache line is written twice, so ``project()`` cost 2-3.6x a same-size copy and the input
gradient, which reads the planes back, 4 passes of that kind. An NCHW convolution's slots are
planes of H * W values, which PyTorch writes in three passes (no single op computes
max(-x, 0)). ``host_kernels.c`` does each in one vectorised pass, at the speed of a same-size
``torch.cat`` (``benchmarks/cpu_layers.py`` prints both; README quotes a run). At M = 4 ... 128
(the sign pattern over groups of log2(M) channels) PyTorch computes the slots and then one
``torch.where`` per slot, 5-21x a copy; the pattern kernels write each group once. At M = 4 in
float32 with pairs of adjacent values (a linear layer or a channels_last convolution with an even
width), an AVX-512 build projects eight groups per step and gathers their input gradient the
same way (``sas_host_avx512()`` says whether this build has it; other CPUs take the generic
loop, which computes the same bits).

The library is built at first use with the host C compiler (``$CC``, ``cc``, ``gcc`` or
``clang``; ``-O3 -march=native``) and cached on disk, keyed by the source, the compiler and its
flags and this CPU's model and feature flags. Where PyTorch runs on libgomp (its Linux wheels) the
library is built with ``-fopenmp`` and shares PyTorch's OpenMP workers (already running, so a
pass splits across threads at a few microseconds' cost; threads of its own competed with those
workers and ran 2x slower on two cores); elsewhere, or when that build fails, with pthreads.
Without a compiler, when the build fails, or with
``SAS_COMPILE_HOST_KERNELS=0``, the callers keep the PyTorch formulation, which computes the same
values (tests compare the two); the reason is logged once on ``sas_compile.runtime``.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from .host_build import build_library, cached_library_path, find_compiler

__all__ = ["available", "library_path", "project_sign", "slot_grad_sign", "project_m2", "slot_grad_m2",
           "MAX_PATTERN_M", "MIN_VALUES"]

SOURCE = Path(__file__).resolve().with_name("host_kernels.c")
COMMON_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c11"]
OPENMP_FLAGS = [*COMMON_FLAGS, "-fopenmp"]
PTHREAD_FLAGS = [*COMMON_FLAGS, "-pthread"]
# values of x below which PyTorch's ops run instead: only empty tensors. At every size the kernel
# call (ctypes, one thread below values_per_thread) measured cheaper than the PyTorch formulation:
# 12-14 us per projection or gradient of 128-4,000 values against 15-28 us at M = 2 (three
# ops) and 60-120 us at M = 4 (a slot computation and a torch.where per slot); the threshold
# of 4,096 values this replaces sent small layers (batch-1 inference, tiny models) to the slower one.
MIN_VALUES = 1
MAX_PATTERN_M = 128  # host_kernels.c takes 2 <= log2(M) <= 7
_DTYPES = {torch.float32: 0, torch.float64: 1}

log = logging.getLogger("sas_compile.runtime")
_lock = threading.Lock()
_state = {"lib": None, "error": None, "values_per_thread": 1 << 19}


def _compiler() -> Optional[str]:
    return find_compiler("CC", ("cc", "gcc", "clang"))


def _cpu_signature() -> str:
    """The CPU model and feature flags (``-march=native`` code must not move to another CPU)."""
    wanted = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in wanted:
                    wanted[key] = value.strip()
    except OSError:
        pass
    return "\0".join([platform.machine(), platform.processor(), *sorted(f"{k}={v}" for k, v in wanted.items())])


def torch_uses_libgomp() -> bool:
    """Whether this process already has ``libgomp.so.1`` loaded (PyTorch's OpenMP runtime on
    Linux), so a library built with ``-fopenmp`` joins PyTorch's workers instead of starting a
    second OpenMP runtime."""
    if not torch.backends.openmp.is_available() or not hasattr(os, "RTLD_NOLOAD"):
        return False
    try:
        ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
    except OSError:
        return False
    return True


def _flag_sets():
    return [OPENMP_FLAGS, PTHREAD_FLAGS] if torch_uses_libgomp() else [PTHREAD_FLAGS]


def library_path(flags=None) -> Path:
    """Where the library for this source, compiler, flags (default: the first this process
    would try) and CPU is cached (raises without a compiler)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no host C compiler found (tried $CC, cc, gcc, clang)")
    return cached_library_path("host", "libsas_host", cc, flags or _flag_sets()[0], [SOURCE], extra=_cpu_signature())


def _build(target: Path, flags) -> None:
    build_library([_compiler(), *flags, str(SOURCE)], target, SOURCE.name)


def _load() -> ctypes.CDLL:
    """Build (once per cache) and load the library: with OpenMP where PyTorch's libgomp is loaded,
    else (or when that build fails) with pthreads; raises the last failure. A flag set whose build
    failed leaves a ``.failed`` marker beside its cached path, so later processes go straight to
    the next one instead of paying a failing compile at every start (a new compiler or source
    is a new path, and is tried again)."""
    error = None
    for flags in _flag_sets():
        path = library_path(flags)
        failed = path.with_name(path.name + ".failed")
        if not path.exists() and failed.exists():
            error = RuntimeError(f"an earlier build with {' '.join(flags)} failed (see {failed})")
            continue
        try:
            if not path.exists():
                _build(path, flags)
            return ctypes.CDLL(str(path))
        except Exception as exc:  # noqa: BLE001 - the next flag set may still build
            error = exc
            try:
                failed.write_text(f"{type(exc).__name__}: {exc}\n")
            except OSError:
                pass
    raise error


def _library() -> Optional[ctypes.CDLL]:
    if os.environ.get("SAS_COMPILE_HOST_KERNELS", "1") == "0":
        return None
    lib = _state["lib"]
    if lib is not None:  # every SAS layer call after the first: no lock
        return lib
    with _lock:
        if _state["lib"] is None and _state["error"] is None:
            try:
                lib = _load()
                int_, ptr, i64 = ctypes.c_int, ctypes.c_void_p, ctypes.c_int64
                # (dtype, tensors..., sizes..., [bits,] [check,] threads), as host_kernels.c declares them
                for name, args in (("sas_host_project_m2", [ptr, ptr, i64, i64, int_]),
                                   ("sas_host_slot_grad_m2", [ptr, ptr, ptr, i64, i64]),
                                   ("sas_host_project_pattern", [ptr, ptr, i64, i64, i64, int_, int_]),
                                   ("sas_host_slot_grad_pattern", [ptr, ptr, ptr, i64, i64, i64, int_])):
                    fn = getattr(lib, name)
                    fn.restype = int_
                    fn.argtypes = [int_, *args, int_]
                lib.sas_host_openmp.restype = ctypes.c_int
                lib.sas_host_openmp.argtypes = []
                _state["values_per_thread"] = 1 << 16 if lib.sas_host_openmp() else 1 << 19
                _state["lib"] = lib
            except Exception as exc:  # noqa: BLE001 - any failure leaves the PyTorch formulation in place
                _state["error"] = f"{type(exc).__name__}: {exc}"
                log.warning("sas-compile host kernels unavailable (%s); SAS layers use the PyTorch formulation "
                            "on the CPU (same values, slower on linear layers)", _state["error"])
        return _state["lib"]


def available() -> Tuple[bool, str]:
    """``(True, library path)`` when the kernels are built and loaded, else ``(False, reason)``
    (the library is built with OpenMP when ``lib.sas_host_openmp()`` is 1, with the AVX-512
    kernels when ``lib.sas_host_avx512()`` is 1)."""
    if os.environ.get("SAS_COMPILE_HOST_KERNELS", "1") == "0":
        return False, "disabled by SAS_COMPILE_HOST_KERNELS=0"
    lib = _library()
    return (True, lib._name) if lib is not None else (False, _state["error"])


_PLAIN = (Tensor, torch.nn.Parameter)


def _applies(x: Tensor, wide: Tensor, M: int) -> bool:
    """Whether a kernel takes ``x`` and its wide tensor (``M`` values per value of ``x``): both
    plain contiguous CPU tensors of one supported dtype (never a fake or functional tensor under
    a compiler's tracing; autograd is the callers': they call these outside it), not empty.
    Every SAS layer call asks, so the cheapest tests come first."""
    n = x.numel()
    return (n >= MIN_VALUES and type(x) in _PLAIN and type(wide) in _PLAIN and x.is_cpu and wide.is_cpu
            and x.dtype in _DTYPES and wide.dtype == x.dtype and wide.numel() == M * n
            and x.is_contiguous() and wide.is_contiguous())


def _threads(n: int, rows: int, threads: Optional[int]) -> int:
    # wide values a thread must have to pay for itself (set at load): a few microseconds to wake
    # a spinning OpenMP worker, tens to start a pthread
    wanted = threads if threads is not None else min(torch.get_num_threads(), n // _state["values_per_thread"])
    return max(1, min(wanted, rows))


def _inner(x: Tensor, dim: int) -> int:
    """The number of values after ``x``'s ``dim`` axis (``dim`` non-negative)."""
    inner = 1
    for size in x.shape[dim + 1:]:
        inner *= size
    return inner


def _layout(M: int, x: Tensor, wide: Tensor, dim: int, threads: Optional[int]):
    """``(library, outer, C, R, threads)`` for a kernel on ``x`` as ``[outer][C][R]`` (``C`` its
    ``dim`` axis) and its wide tensor, or None when the kernels do not apply (M above 128, too
    small, a dtype other than float32/float64, non-contiguous tensors, no library). Threads are
    split over rows (M = 2: ``outer * C``) or groups of log2(M) channels (the sign pattern)."""
    if not (M <= MAX_PATTERN_M and _applies(x, wide, M)):
        return None
    lib = _library()
    if lib is None:
        return None
    dim %= x.dim()
    channels, inner = x.shape[dim], _inner(x, dim)
    outer = x.numel() // (channels * inner)
    bits = M.bit_length() - 1
    units = outer * (channels if M == 2 else -(-channels // bits))
    return lib, outer, channels, inner, _threads(M * x.numel(), units, threads)


def project_m2(x: Tensor, out: Tensor, dim: int, *, check_finite: bool = False,
               threads: Optional[int] = None) -> Optional[bool]:
    """Write ``S(x)`` along ``dim`` at M = 2 into ``out`` (contiguous, ``x``'s shape with 2
    inserted after ``dim``, or that axis doubled: only its layout counts; slot 0 = max(x, 0),
    slot 1 = max(-x, 0)) and return True, or with ``check_finite`` whether every value of ``x``
    is finite; None, with ``out`` untouched, when the kernel does not apply (not built, too
    small, a dtype other than float32/float64, non-contiguous tensors). See :func:`project_sign`."""
    layout = _layout(2, x, out, dim, threads)
    if layout is None:
        return None
    lib, outer, channels, inner, workers = layout
    return lib.sas_host_project_m2(_DTYPES[x.dtype], x.data_ptr(), out.data_ptr(), outer * channels, inner,
                                   int(check_finite), workers) == 0


def slot_grad_m2(grad_wide: Tensor, x: Tensor, dim: int, *, threads: Optional[int] = None) -> Optional[Tensor]:
    """The input gradient at M = 2 along ``dim`` from the wide gradient (contiguous, ``x``'s shape
    with ``dim`` doubled, channel-major) beside a contiguous ``x``: ``g0`` where ``x > 0`` (or is
    NaN), ``-g1`` where ``x <= 0``; None when the kernel does not apply."""
    layout = _layout(2, x, grad_wide, dim, threads)
    if layout is None:
        return None
    lib, outer, channels, inner, workers = layout
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    lib.sas_host_slot_grad_m2(_DTYPES[x.dtype], x.data_ptr(), grad_wide.data_ptr(), out.data_ptr(), outer * channels,
                              inner, workers)
    return out


def project_sign(x: Tensor, out: Tensor, dim: int, M: int, *, check_finite: bool = False,
                 threads: Optional[int] = None) -> Optional[bool]:
    """Write ``S(x)`` of the sign-pattern rule at ``M`` (2, 4, ..., 128) along ``dim`` into ``out``
    (contiguous, ``x``'s shape with ``M`` inserted after ``dim``, or that axis times ``M``), as
    ``projection.project`` computes it, and return True; None, with ``out`` untouched, when the
    kernel does not apply.

    With ``check_finite`` the result is whether every value of ``x`` is finite, checked a block
    at a time right after the block is written, while it is in cache: a layer whose weight has
    all-zero columns must zero their slots only for +-inf and NaN, and asking PyTorch (a sum and
    a handful of scalar ops) cost another pass over ``x`` and tens of microseconds per layer.
    Without it ``x`` is read once (the check measured up to 28% of a projection from cache)."""
    if M == 2:
        return project_m2(x, out, dim, check_finite=check_finite, threads=threads)
    layout = _layout(M, x, out, dim, threads)
    if layout is None:
        return None
    lib, outer, channels, inner, workers = layout
    code = lib.sas_host_project_pattern(_DTYPES[x.dtype], x.data_ptr(), out.data_ptr(), outer, channels, inner,
                                        M.bit_length() - 1, int(check_finite), workers)
    return None if code < 0 else code == 0


def slot_grad_sign(grad_wide: Tensor, x: Tensor, dim: int, M: int, *,
                   threads: Optional[int] = None) -> Optional[Tensor]:
    """The input gradient of the sign-pattern projection at ``M`` along ``dim``: the wide gradient
    at each value's slot, negated where ``x <= 0``; None when the kernel does not apply."""
    if M == 2:
        return slot_grad_m2(grad_wide, x, dim, threads=threads)
    layout = _layout(M, x, grad_wide, dim, threads)
    if layout is None:
        return None
    lib, outer, channels, inner, workers = layout
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    done = lib.sas_host_slot_grad_pattern(_DTYPES[x.dtype], x.data_ptr(), grad_wide.data_ptr(), out.data_ptr(), outer,
                                          channels, inner, M.bit_length() - 1, workers)
    return out if done == 0 else None
