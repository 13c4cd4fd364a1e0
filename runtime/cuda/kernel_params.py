"""The kernels' launch parameters, shared by the CUDA target and the host emulator: the
parameter structs (ctypes mirrors of ``sparse_common.cuh``), kernel names, tile choice,
input checks, grids, and the plans (sequences of launches) of an SAS and an SWS product.

Why this module exists: the emulator runs the very kernels the GPU runs, so both targets
must hand them identical parameters; keeping that in one place keeps them from drifting.
It imports no CUDA library.

An SAS product is two launches: ``sas_compress_*`` writes the compressed S(x) (values and
metadata, see ``operands.py``), then the sparse GEMM multiplies it by the wide weight. An
SWS product is one GEMM launch on the weight's operand, built once per packed weight.
The GEMM is ``spmma_*`` (warp-level mma.sp, sm_80+) or, on sm_90 for float16/bfloat16,
``spwgmma_*`` (warpgroup wgmma.mma_async.sp, built for sm_90a).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import operands

__all__ = [
    "SpGemmParams",
    "CompressParams",
    "PARAM_STRUCTS",
    "FLAG_B_VEC",
    "FLAG_OUT_F32",
    "FLAG_OUT_VEC",
    "FLAG_X_VEC",
    "TILES",
    "MMA_TILES",
    "WGMMA_TILES",
    "SUPPORTED_M",
    "COMPRESS_THREADS",
    "Launch",
    "Plan",
    "gemm_family",
    "prepare_sas",
    "prepare_sws",
    "prepare_compress",
    "empty_result",
]

FLAG_B_VEC = 1
FLAG_OUT_F32 = 2
FLAG_OUT_VEC = 4
FLAG_X_VEC = 8

SUPPORTED_M = (2, 4)
# (rows of the sparse operand, rows of the dense operand) per CTA
TILES = {"64x64": (64, 64), "128x128": (128, 128), "128x256": (128, 256)}
MMA_TILES = ("64x64", "128x128", "128x256")  # spmma.cu (mma.sp, sm_80+); 128x256: 16-bit types only
WGMMA_TILES = ("128x128", "128x256")          # spwgmma.cu (wgmma.mma_async.sp, sm_90a), 16-bit types
COMPRESS_THREADS = 256                 # sas_compress.cu: 8 warps, one (16 rows, k-tile) item each
# dynamic shared memory per CTA of each GEMM family and tile (what the kernels publish; a
# test keeps this equal to the cubins), and the most a block may opt in to per architecture
GEMM_SMEM = {("spmma", "64x64"): 38400, ("spmma", "128x128"): 76800, ("spmma", "128x256"): 131072,
             ("spwgmma", "128x128"): 103424, ("spwgmma", "128x256"): 168960}
SMEM_OPTIN = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_87": 163 * 1024, "sm_89": 99 * 1024,
              "sm_90": 227 * 1024}
_DTYPE_TAG = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
_INT32_MAX = 2**31 - 1


class SpGemmParams(ctypes.Structure):
    """ctypes mirror of ``struct SpGemmParams`` in ``sparse_common.cuh``."""

    _fields_ = [
        ("a_vals", ctypes.c_void_p),
        ("a_meta", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("rows_a", ctypes.c_int),
        ("rows_b", ctypes.c_int),
        ("k", ctypes.c_int),
        ("b_ld", ctypes.c_int),
        ("a_ld", ctypes.c_int),
        ("ktiles", ctypes.c_int),
        ("b_ktiles", ctypes.c_int),
        ("ldo", ctypes.c_int),
        ("flags", ctypes.c_int),
    ]


class CompressParams(ctypes.Structure):
    """ctypes mirror of ``struct CompressParams`` in ``sparse_common.cuh``."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("vals", ctypes.c_void_p),
        ("meta", ctypes.c_void_p),
        ("R", ctypes.c_int),
        ("K", ctypes.c_int),
        ("rows_pad", ctypes.c_int),
        ("ktiles", ctypes.c_int),
        ("a_ld", ctypes.c_int),
        ("flags", ctypes.c_int),
    ]


# the parameter struct of each kernel family, by name prefix
PARAM_STRUCTS = {"sas_compress": CompressParams, "spmma": SpGemmParams, "spwgmma": SpGemmParams}


def param_struct(kernel: str) -> type:
    """The ctypes struct a kernel takes by value."""
    for prefix, struct in PARAM_STRUCTS.items():
        if kernel.startswith(prefix + "_"):
            return struct
    raise KeyError(f"no parameter struct is known for kernel {kernel!r}")


@dataclass
class Launch:
    """A kernel call: its name, grid, parameters, and the tensors that must stay alive."""

    kernel: str
    grid: Tuple[int, int]
    params: ctypes.Structure
    keep_alive: tuple = ()


@dataclass
class Plan:
    """The launches of one product, in order, and its output (``launches`` empty: the
    product of an empty operand, ``out`` already holds it)."""

    launches: List[Launch]
    out: Tensor
    bias: Optional[Tensor] = None
    extras: Dict[str, object] = field(default_factory=dict)

    @property
    def gemm(self) -> Optional[Launch]:
        return self.launches[-1] if self.launches else None


def _aligned(t: Tensor, row_elems: int) -> bool:
    return t.data_ptr() % 16 == 0 and (row_elems * t.element_size()) % 16 == 0


def _check_dtype(name: str, t: Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype} (the dtype of x)")


def _check_device(name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the device of x)")


def _check_int32(**sizes: int) -> None:
    for k, v in sizes.items():
        if v > _INT32_MAX:
            raise ValueError(f"{k}={v} exceeds the kernels' int32 index range")


def gemm_family(arch: Optional[str], dtype: torch.dtype, tile: Optional[str], b_aligned: bool = True) -> str:
    """``"spwgmma"`` on sm_90 for 16-bit types whose dense operand has 16-byte aligned rows
    (unless the 64x64 tile, which only mma.sp has, is asked for), else ``"spmma"``."""
    if tile is not None and tile not in TILES:
        raise ValueError(f"tile={tile!r} is not available; choose one of {sorted(TILES)}")
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    if tile == "128x256" and not sixteen_bit:
        raise ValueError(f"tile='128x256' runs float16/bfloat16; for {dtype} choose '64x64' or '128x128'")
    wgmma_ok = arch in ("sm_90", "sm_90a") and sixteen_bit and b_aligned
    if tile is not None and tile not in WGMMA_TILES:
        return "spmma"
    return "spwgmma" if wgmma_ok else "spmma"


def _pick_tile(family: str, tile: Optional[str], rows_a: int, rows_b: int, sm_count: Optional[int],
               arch: Optional[str] = None) -> str:
    if tile is not None:
        limit = SMEM_OPTIN.get((arch or "").rstrip("a"))
        if limit is not None and GEMM_SMEM[(family, tile)] > limit:
            raise ValueError(
                f"tile={tile!r} needs {GEMM_SMEM[(family, tile)] // 1024} KiB of shared memory per block; "
                f"{arch} allows {limit // 1024} KiB: choose '64x64' or '128x128'")
        return tile
    if family == "spwgmma":
        return "128x128"  # 2 CTAs per SM; 128x256 (1 CTA per SM) is there to be measured
    # the large tile pays off only when it still gives every SM a block
    if sm_count is not None and -(-rows_a // 128) * -(-rows_b // 128) >= sm_count:
        return "128x128"
    return "64x64"


def _out_dtype(x: Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    if out_dtype is None:
        return x.dtype
    if out_dtype not in (x.dtype, torch.float32):
        raise ValueError(f"out_dtype={out_dtype} is not supported: use None (x's dtype) or torch.float32")
    return out_dtype


def empty_result(R: int, N: int, bias: Optional[Tensor], dtype: torch.dtype, device) -> Tensor:
    """The product of an empty operand (K = 0 or no rows): the bias, or zeros, in ``dtype``."""
    out = torch.zeros((R, N), dtype=torch.float32, device=device)
    if bias is not None:
        out += bias.float()
    return out.to(dtype)


def _check_bias(bias: Optional[Tensor], N: int, x2d: Tensor) -> Optional[Tensor]:
    if bias is None:
        return None
    if bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    _check_dtype("bias", bias, x2d.dtype)
    _check_device("bias", bias, x2d.device)
    return bias.contiguous()


def _gemm_launch(family: str, tile: str, dtype: torch.dtype, kind: str, a: operands.SparseOperand, b: Tensor,
                 bias: Optional[Tensor], out: Tensor, rows_a: int, rows_b: int, k: int) -> Launch:
    bm, bn = TILES[tile]
    grid = (-(-rows_a // bm) * -(-rows_b // bn), 1)
    _check_int32(grid=grid[0], rows_pad=a.rows_pad, a_ld=a.a_ld)
    flags = FLAG_B_VEC if _aligned(b, b.shape[1]) else 0
    flags |= FLAG_OUT_F32 if (out.dtype == torch.float32 and dtype != torch.float32) else 0
    flags |= FLAG_OUT_VEC if _aligned(out, out.shape[1]) else 0
    params = SpGemmParams(
        a.vals.data_ptr(), a.meta.data_ptr(), b.data_ptr(), bias.data_ptr() if bias is not None else None,
        out.data_ptr(), rows_a, rows_b, k, b.shape[1], a.a_ld, a.ktiles, a.b_ktiles, out.shape[1], flags,
    )
    name = f"{family}_{_DTYPE_TAG[dtype]}_{tile}_{kind}"
    return Launch(name, grid, params, (a.vals, a.meta, b, bias, out))


def prepare_compress(x2d: Tensor, M: int) -> Tuple[Launch, operands.SparseOperand]:
    """The ``sas_compress`` launch of ``x2d`` [R, K] and the operand it will write."""
    R, K = x2d.shape
    rows_pad, ktiles, a_ld, _ = operands.layout(R, M * K, x2d.dtype)
    _check_int32(items=rows_pad // 16 * ktiles)  # the kernel's work-item index (offsets are 64-bit)
    vals = torch.empty((rows_pad, a_ld), dtype=x2d.dtype, device=x2d.device)
    meta = torch.empty((rows_pad // 16, ktiles, 32), dtype=torch.int32, device=x2d.device)
    items = rows_pad // 16 * ktiles
    grid = (-(-items // (COMPRESS_THREADS // 32)), 1)
    flags = FLAG_X_VEC if _aligned(x2d, K) else 0
    params = CompressParams(x2d.data_ptr(), vals.data_ptr(), meta.data_ptr(), R, K, rows_pad, ktiles, a_ld, flags)
    launch = Launch(f"sas_compress_{_DTYPE_TAG[x2d.dtype]}_m{M}", grid, params, (x2d, vals, meta))
    return launch, operands.SparseOperand(vals, meta, R, M * K, ktiles, ktiles)


def prepare_sas(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, *,
                out_dtype: Optional[torch.dtype] = None, tile: Optional[str] = None,
                sm_count: Optional[int] = None, arch: Optional[str] = None) -> Plan:
    """Check the SAS operands and plan ``S(x2d) @ weight.T + bias``: compress, then GEMM.

    ``arch`` (``"sm_80"``, ``"sm_90"``, ...) picks the GEMM family (wgmma on sm_90 for
    float16/bfloat16); ``tile`` one of :data:`TILES` (None: by size).
    """
    if M not in SUPPORTED_M:
        raise ValueError(
            f"M={M!r}: the SAS kernels handle M in {SUPPORTED_M}; other M need the "
            "CPU-equivalent formulation (sas_matmul falls back to it)"
        )
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be 2-D [R, K], got shape {tuple(x2d.shape)}")
    if x2d.dtype not in _DTYPE_TAG:
        raise TypeError(f"x2d has dtype {x2d.dtype}; supported: float16, bfloat16, float32")
    R, K = x2d.shape
    if weight.dim() != 2 or weight.shape[1] != M * K:
        raise ValueError(
            f"weight must be the wide [N, M*K] = [N, {M * K}] matrix for x2d of K={K} and M={M}, "
            f"got shape {tuple(weight.shape)}"
        )
    N = weight.shape[0]
    _check_dtype("weight", weight, x2d.dtype)
    _check_device("weight", weight, x2d.device)
    bias = _check_bias(bias, N, x2d)
    _check_int32(R=R, N=N, K=K, MK=M * K)
    dtype = _out_dtype(x2d, out_dtype)
    x2d = x2d.contiguous()
    weight = weight.contiguous()
    family = gemm_family(arch, x2d.dtype, tile, _aligned(weight, weight.shape[1]))
    tile = _pick_tile(family, tile, R, N, sm_count, arch)
    if R == 0 or N == 0 or K == 0:
        return Plan([], empty_result(R, N, bias, dtype, x2d.device), bias)
    out = torch.empty((R, N), dtype=dtype, device=x2d.device)
    compress, a = prepare_compress(x2d, M)
    gemm = _gemm_launch(family, tile, x2d.dtype, "sas", a, weight, bias, out, R, N, M * K)
    return Plan([compress, gemm], out, bias, {"operand": a})


def prepare_sws(x2d: Tensor, packed, bias: Optional[Tensor], *,
                out_dtype: Optional[torch.dtype] = None, tile: Optional[str] = None,
                sm_count: Optional[int] = None, arch: Optional[str] = None) -> Plan:
    """Check the SWS operands and plan ``x2d @ unpack(packed).T + bias`` (one GEMM).

    ``packed`` is a ``PackedSparseWeight`` (runtime/packing.py): ``values`` [N, Kp/2],
    ``meta`` [N, Kp/16] int16, ``shape`` (N, K). Its kernel operand is built once and kept
    on it (``operands.sws_operand``).
    """
    for attr in ("values", "meta", "shape"):
        if not hasattr(packed, attr):
            raise TypeError(f"packed must be a PackedSparseWeight (with .values, .meta, .shape); it has no .{attr}")
    if x2d.dim() != 2:
        raise ValueError(f"x2d must be 2-D [R, K], got shape {tuple(x2d.shape)}")
    if x2d.dtype not in _DTYPE_TAG:
        raise TypeError(f"x2d has dtype {x2d.dtype}; supported: float16, bfloat16, float32")
    R, K = x2d.shape
    N, Kw = (int(s) for s in packed.shape)
    if Kw != K:
        raise ValueError(f"packed weight has shape {(N, Kw)} but x2d has K={K} features")
    Kp = -(-K // 16) * 16
    values, meta = packed.values, packed.meta
    if tuple(values.shape) != (N, Kp // 2):
        raise ValueError(f"packed.values must have shape {(N, Kp // 2)}, got {tuple(values.shape)}")
    if tuple(meta.shape) != (N, Kp // 16) or meta.dtype != torch.int16:
        raise ValueError(
            f"packed.meta must be int16 of shape {(N, Kp // 16)}, got {meta.dtype} {tuple(meta.shape)}"
        )
    _check_dtype("packed.values", values, x2d.dtype)
    _check_device("packed.values", values, x2d.device)
    _check_device("packed.meta", meta, x2d.device)
    bias = _check_bias(bias, N, x2d)
    _check_int32(R=R, N=N, Kp=Kp)
    dtype = _out_dtype(x2d, out_dtype)
    x2d = x2d.contiguous()
    family = gemm_family(arch, x2d.dtype, tile, _aligned(x2d, K))
    tile = _pick_tile(family, tile, N, R, sm_count, arch)
    if R == 0 or N == 0 or K == 0:
        return Plan([], empty_result(R, N, bias, dtype, x2d.device), bias)
    a = operands.sws_operand(packed)
    out = torch.empty((R, N), dtype=dtype, device=x2d.device)
    gemm = _gemm_launch(family, tile, x2d.dtype, "sws", a, x2d, bias, out, N, R, K)
    return Plan([gemm], out, bias, {"operand": a})
