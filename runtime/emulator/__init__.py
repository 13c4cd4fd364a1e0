"""The ``emulator`` target: the CUDA kernels of ``runtime/cuda`` run on the host.

Why this exists: the sparse tensor-core kernels must be testable on machines without a GPU.
``sas_emulator_kernels.cpp`` compiles the very ``.cu`` sources with the host C++ compiler
and ``sas_emulator.hpp``, which emulates threads, shared memory, barriers, warp shuffles,
``cp.async`` and ``mma.sp`` (PTX ISA fragment and metadata layouts). The shared library is
built at first use and cached on disk, keyed by the hash of every source, the compiler and
its flags.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..cuda.kernels import GemmParams, Launch, empty_result, prepare_sas, prepare_sws
from ..cuda.nvrtc_build import KERNEL_DIR, cache_dir

__all__ = ["available", "library_path", "sas_gemm", "sws_gemm", "run", "mma_sp_probe_f16", "EmulatorError"]

EMULATOR_DIR = Path(__file__).resolve().parent
CXX_FLAGS = ["-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unknown-pragmas"]
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None


class EmulatorError(RuntimeError):
    """The emulator could not be built, or a kernel reported an error while running."""


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def available() -> Tuple[bool, str]:
    """(True, compiler) when a host C++ compiler can build the emulator, else (False, reason)."""
    cxx = _compiler()
    if cxx is None:
        return False, "no host C++ compiler found (tried $CXX, g++, c++, clang++)"
    return True, cxx


def _sources():
    return sorted(EMULATOR_DIR.glob("*.hpp")) + sorted(EMULATOR_DIR.glob("*.cpp")) + sorted(
        KERNEL_DIR.glob("*.cu*")
    )


def library_path() -> Path:
    """Where the emulator library for the current sources and compiler is cached."""
    ok, cxx = available()
    if not ok:
        raise EmulatorError(cxx)
    h = hashlib.sha256()
    for path in _sources():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h.update("\0".join([cxx, version, *CXX_FLAGS]).encode())
    return cache_dir() / "emulator" / f"libsas_emulator-{h.hexdigest()[:32]}.so"


def _build(target: Path) -> None:
    _, cxx = available()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    cmd = [cxx, *CXX_FLAGS, f"-I{EMULATOR_DIR}", f"-I{KERNEL_DIR}",
           str(EMULATOR_DIR / "sas_emulator_kernels.cpp"), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise EmulatorError(f"building the emulator failed ({' '.join(cmd)}):\n{proc.stderr}")
    os.replace(tmp, target)  # atomic: a concurrent process sees no half-written library


def _library() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is None:
            path = library_path()
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
            lib.sas_emu_launch.restype = ctypes.c_int
            lib.sas_emu_launch.argtypes = [
                ctypes.c_void_p, ctypes.POINTER(GemmParams), ctypes.c_int, ctypes.c_int,
                ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
            ]
            _lib = lib
        return _lib


def run(launch: Launch) -> Tensor:
    """Run a prepared kernel launch in the emulator and return its output tensor."""
    lib = _library()
    try:
        kernel = getattr(lib, launch.kernel)
        threads, smem = (ctypes.c_int * 2).in_dll(lib, f"{launch.kernel}_launch")
    except (AttributeError, ValueError):
        raise EmulatorError(f"the emulator library has no kernel {launch.kernel!r}") from None
    error = ctypes.create_string_buffer(512)
    status = lib.sas_emu_launch(
        ctypes.cast(kernel, ctypes.c_void_p), ctypes.byref(launch.params), launch.grid[0],
        launch.grid[1], threads, smem, error, len(error),
    )
    if status != 0:
        raise EmulatorError(f"{launch.kernel}: {error.value.decode(errors='replace')}")
    return launch.out


def mma_sp_probe_f16(a: Tensor, meta: Tensor, b: Tensor) -> Tensor:
    """One emulated ``mma.sp.m16n8k32`` f16 on one warp, fragments loaded as LLVM's test does.

    ``a`` [16, 16] float16 compressed values, ``meta`` [16, 2] int16 (8 two-bit indices per
    word), ``b`` [8, 32] float16 (B column-major); returns the [16, 8] float32 product. A check
    of the emulator's reading of the PTX metadata layout against published known answers.
    """
    if a.shape != (16, 16) or meta.shape != (16, 2) or b.shape != (8, 32):
        raise ValueError("mma_sp_probe_f16 needs a [16, 16], meta [16, 2], b [8, 32]")
    a = a.to(torch.float16).contiguous()
    b = b.to(torch.float16).contiguous()
    meta = meta.to(torch.int16).contiguous()
    c = torch.empty((16, 8), dtype=torch.float32)
    lib = _library()
    error = ctypes.create_string_buffer(512)
    fn = lib.sas_emu_mma_probe_f16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_char_p, ctypes.c_int]
    if fn(a.data_ptr(), meta.data_ptr(), b.data_ptr(), c.data_ptr(), error, len(error)) != 0:
        raise EmulatorError(f"mma.sp probe: {error.value.decode(errors='replace')}")
    return c


def _check_cpu(x2d: Tensor) -> None:
    if x2d.device.type != "cpu":
        raise ValueError(f"the emulator runs on CPU tensors; x2d is on {x2d.device}")
    if x2d.dtype not in _DTYPES:
        raise TypeError(f"x2d has dtype {x2d.dtype}; the emulator supports float16, bfloat16, float32")


def sas_gemm(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, *,
             out_dtype: Optional[torch.dtype] = None, tile: Optional[str] = "64x64") -> Tensor:
    """``S(x2d) @ weight.T + bias`` by the fused SAS kernel, emulated on CPU tensors.

    ``x2d`` [R, K] narrow, ``weight`` [N, M*K] wide channel-major, ``bias`` [N] or None,
    M in (2, 4); float16/bfloat16 (m16n8k32 2:4) or float32 (tf32 m16n8k16 1:2). The result
    has x's dtype, or ``out_dtype=torch.float32`` for the unrounded fp32 accumulator.
    """
    _check_cpu(x2d)
    launch = prepare_sas(x2d, weight, bias, M, out_dtype=out_dtype, tile=tile)
    R, N, K = launch.params.R, launch.params.N, launch.params.K
    if R == 0 or N == 0 or K == 0:
        return empty_result(R, N, bias, launch.out.dtype, x2d.device)
    return run(launch)


def sws_gemm(x2d: Tensor, packed, bias: Optional[Tensor], *,
             out_dtype: Optional[torch.dtype] = None, tile: Optional[str] = "64x64") -> Tensor:
    """``x2d @ unpack(packed).T + bias`` by the SWS kernel (packed 1:M weight), emulated.

    ``packed`` is a ``PackedSparseWeight`` (values [N, Kp/2], meta [N, Kp/16] int16).
    """
    _check_cpu(x2d)
    launch = prepare_sws(x2d, packed, bias, out_dtype=out_dtype, tile=tile)
    R, N, K = launch.params.R, launch.params.N, launch.params.K
    if R == 0 or N == 0 or K == 0:
        return empty_result(R, N, bias, launch.out.dtype, x2d.device)
    return run(launch)
