"""Loading kernel modules and launching kernels through a CUDA driver API.

Why this module exists: the kernels run on PyTorch's tensors and PyTorch's current stream
without any extension build, and the host-side launch (argument marshalling, geometry,
shared-memory attributes, the stream) is the part a GPU-less CI cannot otherwise see. So
one :class:`Launcher` does it for every target: on a GPU it talks to
``cuda.bindings.driver``; in the emulator it talks to an object with the same functions
(``runtime/emulator/driver.py``) that decodes ``kernelParams`` exactly as the driver does
and runs the kernels' source on the host. Every driver call's status is checked and a
failure raises :class:`CudaError` naming the call.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from .kernel_params import Launch, Plan
from .nvrtc_build import build_module, module_of

__all__ = ["CudaError", "KernelFunction", "Launcher", "driver", "device_arch", "kernel_params",
           "cuda_launcher", "run", "STATIC_SMEM_LIMIT"]

# dynamic shared memory above this needs cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)
STATIC_SMEM_LIMIT = 48 * 1024


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the status."""


def driver():
    """The ``cuda.bindings.driver`` module (ImportError explains how to install it)."""
    try:
        from cuda.bindings import driver as drv
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("cuda.bindings is not installed: pip install 'sas-compile[cuda]'") from e
    return drv


def check(api, result, call: str):
    """Unpack a cuda-python ``(status, *values)`` result, raising CudaError naming ``call``."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        name = api.cuGetErrorName(status)
        detail = name[1].decode() if int(name[0]) == 0 else repr(status)
        raise CudaError(f"{call} failed: {detail} ({int(status)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_arch(device: int) -> str:
    """``sm_XY`` of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def kernel_params(params: ctypes.Structure) -> ctypes.Array:
    """The ``kernelParams`` array of ``cuLaunchKernel`` for a kernel taking one struct.

    The driver reads argument i from the address in entry i: every kernel here takes one
    argument, its parameter struct (``SpGemmParams`` or ``CompressParams``) by value, so the
    one entry is the struct's own address (not the address of a pointer to it). The caller
    keeps ``params`` alive until the launch returns.
    """
    return (ctypes.c_void_p * 1)(ctypes.addressof(params))


@dataclass(frozen=True)
class KernelFunction:
    """A loaded kernel: the driver's function handle and its published launch geometry."""

    handle: object
    threads: int
    smem: int


class Launcher:
    """Loads modules and launches prepared kernels through one driver API object.

    ``api``: ``cuda.bindings.driver`` or an object with the same functions (the emulator's).
    ``image(module_name)``: the module image handed to ``cuModuleLoadData`` (a cubin).
    ``context``: the context made current before driver calls (None: leave it as it is).
    """

    def __init__(self, api, image: Callable[[str], bytes], context=None):
        self.api = api
        self._image = image
        self._context = context
        self._lock = threading.Lock()
        self._modules: Dict[str, object] = {}
        self._functions: Dict[str, KernelFunction] = {}

    @contextlib.contextmanager
    def _current(self):
        """The launcher's context made current for the block, the caller's put back after it
        (PyTorch reads its current device from the thread's current context)."""
        if self._context is None:
            yield
            return
        api = self.api
        previous = check(api, api.cuCtxGetCurrent(), "cuCtxGetCurrent")
        check(api, api.cuCtxSetCurrent(self._context), "cuCtxSetCurrent")
        try:
            yield
        finally:
            check(api, api.cuCtxSetCurrent(previous), "cuCtxSetCurrent")

    def function(self, kernel: str) -> KernelFunction:
        """The kernel's handle, threads per block and dynamic shared memory (loaded once)."""
        with self._lock:
            if kernel in self._functions:
                return self._functions[kernel]
            with self._current():
                self._functions[kernel] = self._load(kernel)
            return self._functions[kernel]

    def _load(self, kernel: str) -> KernelFunction:
        api = self.api
        module_name = module_of(kernel)
        if module_name not in self._modules:
            self._modules[module_name] = check(
                api, api.cuModuleLoadData(self._image(module_name)), f"cuModuleLoadData({module_name})")
        module = self._modules[module_name]
        func = check(api, api.cuModuleGetFunction(module, kernel.encode()), f"cuModuleGetFunction({kernel})")
        ptr, size = check(api, api.cuModuleGetGlobal(module, f"{kernel}_launch".encode()),
                          f"cuModuleGetGlobal({kernel}_launch)")
        geometry = (ctypes.c_int * 2)()
        if int(size) != ctypes.sizeof(geometry):
            raise CudaError(f"{kernel}_launch has {int(size)} bytes, expected {ctypes.sizeof(geometry)}")
        check(api, api.cuMemcpyDtoH(ctypes.addressof(geometry), ptr, ctypes.sizeof(geometry)),
              f"cuMemcpyDtoH({kernel}_launch)")
        threads, smem = int(geometry[0]), int(geometry[1])
        if smem > STATIC_SMEM_LIMIT:
            check(api, api.cuFuncSetAttribute(
                func, api.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
                f"cuFuncSetAttribute({kernel}, MAX_DYNAMIC_SHARED_SIZE_BYTES={smem})")
        return KernelFunction(func, threads, smem)

    def launch(self, prepared: Launch, stream: int) -> None:
        """Launch ``prepared`` on the stream with handle ``stream``."""
        fn = self.function(prepared.kernel)
        api = self.api
        params = kernel_params(prepared.params)
        gx, gy = prepared.grid
        with self._current():
            check(api, api.cuLaunchKernel(fn.handle, gx, gy, 1, fn.threads, 1, 1, fn.smem, api.CUstream(stream),
                                          ctypes.addressof(params), 0),
                  f"cuLaunchKernel({prepared.kernel}, grid=({gx}, {gy}), block={fn.threads}, smem={fn.smem})")


def run(launcher: Launcher, plan: Plan, stream: int) -> torch.Tensor:
    """Run a plan's launches in order on one stream; returns its output (a plan of an empty
    operand has no launch and its output already holds the result)."""
    for prepared in plan.launches:
        launcher.launch(prepared, stream)
    return plan.out


_cuda_lock = threading.Lock()
_cuda_launchers: Dict[int, Launcher] = {}


def cuda_launcher(device: int, api=None) -> Launcher:
    """The launcher of CUDA device ``device``, in PyTorch's primary context.

    ``api`` replaces ``cuda.bindings.driver`` (tests pass a recording fake); the default
    launcher of a device is built once per process.
    """
    if api is None:
        with _cuda_lock:
            if device not in _cuda_launchers:
                _cuda_launchers[device] = _new_cuda_launcher(device, driver())
            return _cuda_launchers[device]
    return _new_cuda_launcher(device, api)


def _new_cuda_launcher(device: int, api) -> Launcher:
    check(api, api.cuInit(0), "cuInit")
    dev = check(api, api.cuDeviceGet(device), "cuDeviceGet")
    # PyTorch works in the primary context: retain it once, make it current before each call
    ctx = check(api, api.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    arch = device_arch(device)
    return Launcher(api, lambda module: build_module(module, arch).cubin, context=ctx)


def current_stream(device: int) -> int:
    """The handle of PyTorch's current stream on ``device``."""
    return int(torch.cuda.current_stream(device).cuda_stream)


def launch(plan: Plan, api=None, stream: Optional[int] = None) -> torch.Tensor:
    """Run a plan on its tensors' CUDA device and PyTorch's current stream."""
    device = plan.out.device.index
    if device is None:
        device = torch.cuda.current_device()
    launcher = cuda_launcher(device, api)
    return run(launcher, plan, current_stream(device) if stream is None else stream)
