"""Loading the cubins and launching the kernels through ``cuda.bindings.driver``.

Why this module exists: the kernels run on PyTorch's tensors and PyTorch's current stream
without any extension build; every driver call's status is checked and a failure raises
:class:`CudaError` naming the call.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Dict, Tuple

import torch

from .kernels import Launch
from .nvrtc_build import build_module

__all__ = ["CudaError", "driver", "device_arch", "launch"]

_STATIC_SMEM_LIMIT = 48 * 1024
_lock = threading.Lock()
_functions: Dict[Tuple[int, str], Tuple[object, int, int]] = {}
_modules: Dict[Tuple[int, str], object] = {}


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the status."""


def driver():
    """The ``cuda.bindings.driver`` module (ImportError explains how to install it)."""
    try:
        from cuda.bindings import driver as drv
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("cuda.bindings is not installed: pip install 'sas-compile[cuda]'") from e
    return drv


def check(result, call: str):
    """Unpack a cuda-python ``(status, *values)`` result, raising CudaError naming ``call``."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        drv = driver()
        name = drv.cuGetErrorName(status)
        detail = name[1].decode() if int(name[0]) == 0 else repr(status)
        raise CudaError(f"{call} failed: {detail} ({int(status)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _make_current(device: int) -> None:
    drv = driver()
    check(drv.cuInit(0), "cuInit")
    dev = check(drv.cuDeviceGet(device), "cuDeviceGet")
    # PyTorch works in the primary context: retain it and make it current on this thread
    ctx = check(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    check(drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


def device_arch(device: int) -> str:
    """``sm_XY`` of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _function(device: int, kernel: str) -> Tuple[object, int, int]:
    key = (device, kernel)
    with _lock:
        if key in _functions:
            return _functions[key]
        drv = driver()
        _make_current(device)
        module_name = kernel.split("_")[0] + "_gemm"
        mkey = (device, module_name)
        if mkey not in _modules:
            cubin = build_module(module_name, device_arch(device)).cubin
            _modules[mkey] = check(drv.cuModuleLoadData(cubin), f"cuModuleLoadData({module_name})")
        module = _modules[mkey]
        func = check(drv.cuModuleGetFunction(module, kernel.encode()), f"cuModuleGetFunction({kernel})")
        ptr, size = check(drv.cuModuleGetGlobal(module, f"{kernel}_launch".encode()),
                          f"cuModuleGetGlobal({kernel}_launch)")
        geometry = (ctypes.c_int * 2)()
        check(drv.cuMemcpyDtoH(ctypes.addressof(geometry), ptr, ctypes.sizeof(geometry)),
              f"cuMemcpyDtoH({kernel}_launch)")
        threads, smem = int(geometry[0]), int(geometry[1])
        if smem > _STATIC_SMEM_LIMIT:
            check(drv.cuFuncSetAttribute(
                func, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
                f"cuFuncSetAttribute({kernel}, MAX_DYNAMIC_SHARED_SIZE_BYTES={smem})")
        _functions[key] = (func, threads, smem)
        return _functions[key]


def launch(prepared: Launch) -> torch.Tensor:
    """Launch a prepared kernel on the tensors' device and PyTorch's current stream."""
    device = prepared.out.device.index if prepared.out.device.index is not None else torch.cuda.current_device()
    func, threads, smem = _function(device, prepared.kernel)
    drv = driver()
    _make_current(device)
    stream = drv.CUstream(torch.cuda.current_stream(device).cuda_stream)
    arg = ctypes.c_void_p(ctypes.addressof(prepared.params))
    args = (ctypes.c_void_p * 1)(ctypes.addressof(arg))
    gx, gy = prepared.grid
    check(drv.cuLaunchKernel(func, gx, gy, 1, threads, 1, 1, smem, stream, ctypes.addressof(args), 0),
          f"cuLaunchKernel({prepared.kernel}, grid=({gx}, {gy}), block={threads}, smem={smem})")
    return prepared.out
