"""The ``emulator`` target: the CUDA kernels of ``runtime/cuda`` run on the host.

Why this exists: the sparse tensor-core kernels must be testable on machines without a GPU.
``sas_emulator_kernels.cpp`` compiles the very ``.cu`` sources with the host C++ compiler
and ``sas_emulator.hpp``, which emulates threads, shared memory (with bounds checks and a
bank-conflict counter), barriers, ``ldmatrix``, ``cp.async``, ``mma.sp`` and Hopper's
``wgmma.mma_async.sp`` (PTX ISA fragment, metadata and shared-memory descriptor layouts).
The shared library is built at first use and cached on disk, keyed by the hash of every
source, the compiler and its flags. Kernels are launched through the CUDA target's own
launcher (``runtime/cuda/launch.py``) with :class:`driver.EmulatorDriver` in place of the
driver, so the host-side launch code runs here exactly as on a GPU.

``sas_gemm`` / ``sws_gemm`` run the sm_80 kernel family (mma.sp); ``run(prepare_sas(...,
arch="sm_90"))`` runs the sm_90a one (wgmma.mma_async.sp).
"""
from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ..cuda.kernel_params import Plan, prepare_sas, prepare_sws
from ..cuda.launch import Launcher
from ..cuda.launch import run as _run_launch
from ..cuda.nvrtc_build import KERNEL_DIR
from ..host_build import build_library, cached_library_path, find_compiler
from .driver import EmulatorDriver, EmulatorError

__all__ = ["available", "library_path", "sas_gemm", "sws_gemm", "run", "launcher", "struct_layout",
           "kernel_registry", "smem_stats", "mma_sp_probe_f16", "wgmma_sp_probe", "bank_probe", "EmulatorError"]

EMULATOR_DIR = Path(__file__).resolve().parent
CXX_FLAGS = ["-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unknown-pragmas"]
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None


def _compiler() -> Optional[str]:
    return find_compiler("CXX", ("g++", "c++", "clang++"))


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
    return cached_library_path("emulator", "libsas_emulator", cxx, CXX_FLAGS, _sources())


def _build(target: Path) -> None:
    _, cxx = available()
    try:
        build_library([cxx, *CXX_FLAGS, f"-I{EMULATOR_DIR}", f"-I{KERNEL_DIR}",
                       str(EMULATOR_DIR / "sas_emulator_kernels.cpp")], target, "the emulator")
    except RuntimeError as exc:
        raise EmulatorError(str(exc)) from None


def _library() -> ctypes.CDLL:
    global _lib
    with _lock:
        if _lib is None:
            path = library_path()
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
            lib.sas_emu_launch_kernel.restype = ctypes.c_int
            lib.sas_emu_launch_kernel.argtypes = [
                ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_char_p, ctypes.c_int,
            ]
            _lib = lib
        return _lib


_launcher: Optional[Launcher] = None


def launcher(on_launch=None) -> Launcher:
    """The emulator's :class:`Launcher`: ``launch.py``'s code over :class:`EmulatorDriver`.

    ``on_launch(record)`` sees every ``cuLaunchKernel`` (a new launcher is returned then).
    """
    global _launcher
    if on_launch is not None:
        return Launcher(EmulatorDriver(_library, on_launch), lambda module: module.encode())
    with _lock:
        if _launcher is None:
            _launcher = Launcher(EmulatorDriver(_library), lambda module: module.encode())
        return _launcher


def struct_layout(name: str) -> Tuple[int, ...]:
    """``(sizeof(struct), offset of each field...)`` of a parameter struct as the C++ compiler
    lays it out (``SpGemmParams``, ``CompressParams``)."""
    lib = _library()
    fn = lib.sas_emu_struct_layout
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    out = (ctypes.c_int * 64)()
    n = fn(name.encode(), out, 64)
    if n < 0:
        raise KeyError(f"the emulator knows no parameter struct {name!r}")
    return tuple(out[:n])


def kernel_registry() -> Dict[str, Tuple[str, int]]:
    """``{kernel: (parameter struct, sizeof)}`` of every kernel in the emulator library."""
    lib = _library()
    lib.sas_emu_kernel_name.restype = ctypes.c_char_p
    lib.sas_emu_kernel_param_type.restype = ctypes.c_char_p
    out = {}
    for i in range(lib.sas_emu_kernel_count()):
        out[lib.sas_emu_kernel_name(i).decode()] = (lib.sas_emu_kernel_param_type(i).decode(),
                                                    int(lib.sas_emu_kernel_param_size(i)))
    return out


SMEM_KINDS = ("ld.shared", "st.shared", "ldmatrix", "cp.async")


def smem_stats() -> Dict[str, object]:
    """Shared-memory accesses of the last emulated launch.

    ``{kind: {"instructions", "wavefronts", "ideal", "extra"}}`` for every kind in
    :data:`SMEM_KINDS` (warp-wide instructions; wavefronts they took; wavefronts without
    bank conflicts; the difference), plus ``"example"``: the first conflicting access.
    """
    lib = _library()
    values = (ctypes.c_longlong * 12)()
    example = ctypes.create_string_buffer(512)
    lib.sas_emu_smem_stats(values, example, len(example))
    stats: Dict[str, object] = {}
    for i, kind in enumerate(SMEM_KINDS):
        n, wave, ideal = values[3 * i], values[3 * i + 1], values[3 * i + 2]
        stats[kind] = {"instructions": n, "wavefronts": wave, "ideal": ideal, "extra": wave - ideal}
    stats["example"] = example.value.decode(errors="replace")
    return stats


def run(plan: Plan) -> Tensor:
    """Run a prepared plan's launches in the emulator and return its output tensor."""
    return _run_launch(launcher(), plan, 0)


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


def wgmma_sp_probe(image: Tensor, desc_a: int, desc_b: int, meta: Tensor, d: Tensor, *, bf16: bool = False,
                   omit: Tuple[str, ...] = ()) -> Tensor:
    """One emulated ``wgmma.mma_async.sp.m64nNk32`` by one warpgroup, operands in shared memory.

    ``image``: uint8 shared-memory image (placed at a 1 KiB aligned origin); ``desc_a``,
    ``desc_b``: matrix descriptors whose start addresses are relative to that origin;
    ``meta``: int32 [128], each thread's metadata register; ``d``: float32 [128, N/2], each
    thread's accumulator registers (C in). Returns the registers after the instruction (D).
    ``omit``: mistakes to make on purpose ("proxy_fence", "wgmma_fence", "wait"), which the
    emulator must report.
    """
    flags = {"proxy_fence": 1, "wgmma_fence": 2, "wait": 4}
    omit_bits = sum(flags[o] for o in omit)
    n = 2 * d.shape[1]
    if image.dtype != torch.uint8 or image.dim() != 1 or meta.shape != (128,) or d.shape[0] != 128:
        raise ValueError("wgmma_sp_probe needs a uint8 image, meta [128] and d [128, N/2]")
    image = image.contiguous()
    meta = meta.to(torch.int32).contiguous()
    out = d.to(torch.float32).contiguous().clone()
    lib = _library()
    fn = lib.sas_emu_wgmma_probe
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    error = ctypes.create_string_buffer(512)
    if fn(image.data_ptr(), image.numel(), desc_a, desc_b, meta.data_ptr(), out.data_ptr(), n, int(bf16), omit_bits,
          error, len(error)) != 0:
        raise EmulatorError(f"wgmma.sp probe: {error.value.decode(errors='replace')}")
    return out


def bank_probe(stride: int, bytes_per_lane: int = 4, ldmatrix: bool = False) -> Dict[str, object]:
    """One warp-wide shared load whose lanes are ``stride`` bytes apart; its :func:`smem_stats`."""
    lib = _library()
    fn = lib.sas_emu_bank_probe
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    error = ctypes.create_string_buffer(512)
    if fn(stride, bytes_per_lane, int(ldmatrix), error, len(error)) != 0:
        raise EmulatorError(f"bank probe: {error.value.decode(errors='replace')}")
    return smem_stats()


def _check_cpu(x2d: Tensor) -> None:
    if x2d.device.type != "cpu":
        raise ValueError(f"the emulator runs on CPU tensors; x2d is on {x2d.device}")
    if x2d.dtype not in _DTYPES:
        raise TypeError(f"x2d has dtype {x2d.dtype}; the emulator supports float16, bfloat16, float32")


def sas_gemm(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, *,
             out_dtype: Optional[torch.dtype] = None, tile: Optional[str] = "64x64") -> Tensor:
    """``S(x2d) @ weight.T + bias`` by the SAS kernels (compress, mma.sp GEMM), emulated on
    CPU tensors.

    ``x2d`` [R, K] narrow, ``weight`` [N, M*K] wide channel-major, ``bias`` [N] or None,
    M in (2, 4); float16/bfloat16 (m16n8k32 2:4) or float32 (tf32 m16n8k16 1:2). The result
    has x's dtype, or ``out_dtype=torch.float32`` for the unrounded fp32 accumulator.
    """
    _check_cpu(x2d)
    return run(prepare_sas(x2d, weight, bias, M, out_dtype=out_dtype, tile=tile))


def sws_gemm(x2d: Tensor, packed, bias: Optional[Tensor], *,
             out_dtype: Optional[torch.dtype] = None, tile: Optional[str] = "64x64") -> Tensor:
    """``x2d @ unpack(packed).T + bias`` by the SWS kernel (packed 1:M weight), emulated.

    ``packed`` is a ``PackedSparseWeight`` (values [N, Kp/2], meta [N, Kp/16] int16).
    """
    _check_cpu(x2d)
    return run(prepare_sws(x2d, packed, bias, out_dtype=out_dtype, tile=tile))
