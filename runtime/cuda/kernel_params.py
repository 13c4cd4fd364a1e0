"""The kernels' launch parameters, shared by the CUDA target and the host emulator: the
``GemmParams`` struct (mirrors ``gemm_common.cuh``), kernel names, tile choice, input checks
and grids.

Why this module exists: the emulator runs the very kernels the GPU runs, so both targets
must hand them identical parameters; keeping that in one place keeps them from drifting.
It imports no CUDA library.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "GemmParams",
    "FLAG_A_ALIGNED",
    "FLAG_B_ALIGNED",
    "FLAG_OUT_F32",
    "TILES",
    "SUPPORTED_M",
    "Launch",
    "prepare_sas",
    "prepare_sws",
    "empty_result",
]

FLAG_A_ALIGNED = 1
FLAG_B_ALIGNED = 2
FLAG_OUT_F32 = 4

SUPPORTED_M = (2, 4)
TILES = {"64x64": (64, 64), "128x128": (128, 128)}  # (rows of the sparse operand, dense columns)
_DTYPE_TAG = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
_INT32_MAX = 2**31 - 1
_GRID_Y_MAX = 65535


class GemmParams(ctypes.Structure):
    """ctypes mirror of ``struct GemmParams`` in ``gemm_common.cuh``."""

    _fields_ = [
        ("a", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("meta", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("R", ctypes.c_int),
        ("N", ctypes.c_int),
        ("K", ctypes.c_int),
        ("Kp", ctypes.c_int),
        ("flags", ctypes.c_int),
    ]


@dataclass
class Launch:
    """A kernel call: its name, grid, parameters, and the tensors that must stay alive."""

    kernel: str
    grid: Tuple[int, int]
    params: GemmParams
    out: Tensor
    keep_alive: tuple
    bias: Optional[Tensor] = None


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


def _pick_tile(tile: Optional[str], rows_a: int, cols_b: int, sm_count: Optional[int]) -> str:
    if tile is not None:
        if tile not in TILES:
            raise ValueError(f"tile={tile!r} is not available; choose one of {sorted(TILES)}")
        return tile
    # the large tile pays off only when it still gives every SM a block
    if sm_count is not None and -(-rows_a // 128) * -(-cols_b // 128) >= sm_count:
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


def prepare_sas(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, *,
                out_dtype: Optional[torch.dtype] = None, tile: Optional[str] = None,
                sm_count: Optional[int] = None) -> Launch:
    """Check the SAS GEMM operands and build its launch: out = S(x2d) @ weight.T + bias."""
    if M not in SUPPORTED_M:
        raise ValueError(
            f"M={M!r}: the fused SAS kernel handles M in {SUPPORTED_M}; other M need the "
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
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        _check_dtype("bias", bias, x2d.dtype)
        _check_device("bias", bias, x2d.device)
        bias = bias.contiguous()
    _check_int32(R=R, N=N, K=K, MK=M * K)
    x2d = x2d.contiguous()
    weight = weight.contiguous()
    dtype = _out_dtype(x2d, out_dtype)
    out = torch.empty((R, N), dtype=dtype, device=x2d.device)
    tile = _pick_tile(tile, R, N, sm_count)
    bm, bn = TILES[tile]
    grid = (-(-R // bm), -(-N // bn))
    if grid[1] > _GRID_Y_MAX:
        raise ValueError(f"N={N} needs {grid[1]} blocks along grid y; at most {_GRID_Y_MAX} are allowed")
    flags = (FLAG_A_ALIGNED if _aligned(x2d, K) else 0) | (FLAG_B_ALIGNED if _aligned(weight, M * K) else 0)
    flags |= FLAG_OUT_F32 if (dtype == torch.float32 and x2d.dtype != torch.float32) else 0
    params = GemmParams(
        x2d.data_ptr(), weight.data_ptr(), None, bias.data_ptr() if bias is not None else None,
        out.data_ptr(), R, N, K, 0, flags,
    )
    name = f"sas_gemm_{_DTYPE_TAG[x2d.dtype]}_m{M}_{tile}"
    return Launch(name, grid, params, out, (x2d, weight, bias, out), bias)


def prepare_sws(x2d: Tensor, packed, bias: Optional[Tensor], *,
                out_dtype: Optional[torch.dtype] = None, tile: Optional[str] = None,
                sm_count: Optional[int] = None) -> Launch:
    """Check the SWS GEMM operands and build its launch: out = x2d @ unpack(packed).T + bias.

    ``packed`` is a ``PackedSparseWeight`` (runtime/packing.py): ``values`` [N, Kp/2],
    ``meta`` [N, Kp/16] int16, ``shape`` (N, K).
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
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        _check_dtype("bias", bias, x2d.dtype)
        _check_device("bias", bias, x2d.device)
        bias = bias.contiguous()
    _check_int32(R=R, N=N, Kp=Kp)
    x2d = x2d.contiguous()
    values = values.contiguous()
    meta = meta.contiguous()
    dtype = _out_dtype(x2d, out_dtype)
    out = torch.empty((R, N), dtype=dtype, device=x2d.device)
    tile = _pick_tile(tile, N, R, sm_count)
    bm, bn = TILES[tile]
    grid = (-(-R // bn), -(-N // bm))
    if grid[1] > _GRID_Y_MAX:
        raise ValueError(f"N={N} needs {grid[1]} blocks along grid y; at most {_GRID_Y_MAX} are allowed")
    flags = (FLAG_A_ALIGNED if _aligned(values, Kp // 2) else 0) | (FLAG_B_ALIGNED if _aligned(x2d, K) else 0)
    flags |= FLAG_OUT_F32 if (dtype == torch.float32 and x2d.dtype != torch.float32) else 0
    params = GemmParams(
        values.data_ptr(), x2d.data_ptr(), meta.data_ptr(),
        bias.data_ptr() if bias is not None else None, out.data_ptr(), R, N, K, Kp, flags,
    )
    name = f"sws_gemm_{_DTYPE_TAG[x2d.dtype]}_{tile}"
    return Launch(name, grid, params, out, (x2d, values, meta, bias, out), bias)
