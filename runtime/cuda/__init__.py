"""The ``cuda`` target: Sparse Tensor Core kernels (``.cu`` files in this folder).

``sas_gemm`` is the SAS product: ``sas_compress`` writes the projected activation S(x) in
its compressed 2:4 (float16/bfloat16) or 1:2 (tf32) form straight from the narrow x (one
memory-bound pass; the wide S(x) never exists), then the sparse GEMM multiplies it by the
wide weight. ``sws_gemm`` is the 1:M weight-sparse product on the same GEMM. The GEMM is
``spmma`` (warp-level mma.sp, sm_80+) or, on sm_90 for 16-bit types, ``spwgmma``
(wgmma.mma_async.sp). Kernels are compiled by NVRTC for the GPU's arch at first use
(cubins cached on disk, see ``nvrtc_build``) and launched with ``cuda.bindings.driver`` on
PyTorch's current stream. ``compile_all(arch)`` returns every module's cubin for an arch
without needing a GPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .kernel_params import prepare_sas, prepare_sws
from .nvrtc_build import CudaBuildError, compile_all, kernel_names

__all__ = ["available", "compile_all", "kernel_names", "sas_gemm", "sws_gemm", "sas_plan", "run_plan",
           "CudaBuildError"]


def available() -> Tuple[bool, str]:
    """(True, device description) when the kernels can run here, else (False, reason)."""
    try:
        from cuda.bindings import driver, nvrtc  # noqa: F401
    except ImportError:
        return False, "cuda-python (cuda.bindings) is not installed: pip install 'sas-compile[cuda]'"
    try:
        from .nvrtc_build import nvrtc_version

        nvrtc_version()
    except Exception as e:  # the wheel is there but libnvrtc is not loadable
        return False, f"NVRTC is not usable: {e}"
    if not torch.cuda.is_available():
        return False, "no CUDA driver or GPU visible to PyTorch (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"the GPU is sm_{major}{minor}; mma.sp needs sm_80 or newer"
    return True, f"{torch.cuda.get_device_name()} (sm_{major}{minor})"


def _check_cuda(x2d: Tensor) -> None:
    if x2d.device.type != "cuda":
        raise ValueError(f"the cuda target needs CUDA tensors; x2d is on {x2d.device}")


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def sas_gemm(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, *,
             out_dtype: Optional[torch.dtype] = None, tile: Optional[str] = None) -> Tensor:
    """``S(x2d) @ weight.T + bias`` by the SAS kernels (compress, sparse GEMM) on CUDA tensors.

    ``x2d`` [R, K] narrow, ``weight`` [N, M*K] wide channel-major, ``bias`` [N] or None,
    M in (2, 4). float16/bfloat16 run 2:4 (mma.sp m16n8k32, or wgmma.mma_async.sp on sm_90),
    float32 tf32 1:2 (mma.sp m16n8k16); fp32 accumulation; the result has x's dtype (or
    ``out_dtype=torch.float32``). ``tile``: one of ``kernel_params.TILES`` (None: by size).
    """
    from .launch import launch

    _check_cuda(x2d)
    return launch(prepare_sas(x2d, weight, bias, M, out_dtype=out_dtype, tile=tile,
                              sm_count=_sm_count(x2d.device), arch=_arch(x2d.device)))


def sws_gemm(x2d: Tensor, packed, bias: Optional[Tensor], *,
             out_dtype: Optional[torch.dtype] = None, tile: Optional[str] = None) -> Tensor:
    """``x2d @ unpack(packed).T + bias`` by the SWS kernel on CUDA tensors.

    ``packed`` is a ``PackedSparseWeight`` (values [N, Kp/2], meta [N, Kp/16] int16).
    """
    from .launch import launch

    _check_cuda(x2d)
    return launch(prepare_sws(x2d, packed, bias, out_dtype=out_dtype, tile=tile,
                              sm_count=_sm_count(x2d.device), arch=_arch(x2d.device)))


def sas_plan(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, *,
             out_dtype: Optional[torch.dtype] = None, tile: Optional[str] = None):
    """The launches of :func:`sas_gemm` for these CUDA tensors, not yet run: ``plan.launches``
    is ``[compress, gemm]`` and ``plan.extras["operand"]`` the compressed S(x) buffers (for
    benchmarks that time the two kernels apart)."""
    _check_cuda(x2d)
    return prepare_sas(x2d, weight, bias, M, out_dtype=out_dtype, tile=tile, sm_count=_sm_count(x2d.device),
                       arch=_arch(x2d.device))


def run_plan(plan) -> Tensor:
    """Run a plan (or a sub-plan of some of its launches) on PyTorch's current stream."""
    from .launch import launch

    return launch(plan)


def __getattr__(name):
    # submodules are attributes too (``sas_compile.runtime.cuda.static_facts`` after ``import sas_compile``)
    import importlib
    import importlib.util

    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
