"""The emulator's CUDA driver: the functions of ``cuda.bindings.driver`` that
``runtime/cuda/launch.py`` calls, implemented over the host build of the kernels.

Why this exists: the launch code of the CUDA target must run in CI. The emulator target
therefore launches through the very same :class:`~sas_compile.runtime.cuda.launch.Launcher`
as a GPU, with this object in place of the driver. It keeps the driver's contract where a
mistake would fault on hardware: ``kernelParams`` is decoded in C++ as the driver decodes it
(entry i points at argument i's bytes), dynamic shared memory above 48 KiB needs
``cuFuncSetAttribute`` first, the block size must be the one the kernel was written for,
and statuses are cuda-python's ``(CUresult, *values)`` tuples.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

__all__ = ["EmulatorDriver", "EmulatedFunction", "EmulatorError", "CUDA_SUCCESS", "CUDA_ERROR_INVALID_VALUE",
           "CUDA_ERROR_NOT_FOUND"]

CUDA_SUCCESS = 0
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_INVALID_HANDLE = 400
CUDA_ERROR_NOT_FOUND = 500
_ERROR_NAMES = {
    CUDA_SUCCESS: b"CUDA_SUCCESS",
    CUDA_ERROR_INVALID_VALUE: b"CUDA_ERROR_INVALID_VALUE",
    CUDA_ERROR_INVALID_HANDLE: b"CUDA_ERROR_INVALID_HANDLE",
    CUDA_ERROR_NOT_FOUND: b"CUDA_ERROR_NOT_FOUND",
}
_DEFAULT_MAX_DYNAMIC_SMEM = 48 * 1024
_OPTIN_MAX_DYNAMIC_SMEM = 227 * 1024  # sm_90's opt-in limit per block


class EmulatorError(RuntimeError):
    """The emulator could not be built, or a kernel reported an error while running."""


class CUstream(int):
    """A stream handle (the emulator runs every launch synchronously, on the host)."""


class _FunctionAttribute:
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


@dataclass
class EmulatedFunction:
    """What ``cuModuleGetFunction`` returns: the host kernel and its dynamic-smem limit."""

    name: str
    address: int
    threads: int
    smem: int
    max_dynamic_smem: int = _DEFAULT_MAX_DYNAMIC_SMEM


@dataclass
class _Module:
    image: bytes
    functions: Dict[str, EmulatedFunction] = field(default_factory=dict)


class EmulatorDriver:
    """``cuda.bindings.driver``'s launch-related functions, backed by the emulator library.

    ``library``: a callable returning the loaded emulator ``ctypes.CDLL``.
    ``on_launch``: called with a record of every launch before it runs (tests use it).
    """

    CUstream = CUstream
    CUfunction_attribute = _FunctionAttribute

    def __init__(self, library: Callable[[], ctypes.CDLL], on_launch: Optional[Callable[[dict], None]] = None):
        self._library = library
        self._on_launch = on_launch
        self._modules: List[_Module] = []
        self.last_error = ""
        self.current_context = None  # the calling thread's current context (one thread here)

    # ---- errors, devices and contexts: one device, one context
    def cuGetErrorName(self, status):
        name = _ERROR_NAMES.get(int(status))
        return (CUDA_SUCCESS, name) if name else (CUDA_ERROR_INVALID_VALUE, None)

    def cuInit(self, flags):
        return (CUDA_SUCCESS,)

    def cuDeviceGet(self, ordinal):
        return (CUDA_SUCCESS, int(ordinal))

    def cuDevicePrimaryCtxRetain(self, device):
        return (CUDA_SUCCESS, ("emulator-context", device))

    def cuCtxGetCurrent(self):
        return (CUDA_SUCCESS, self.current_context)

    def cuCtxSetCurrent(self, context):
        self.current_context = context
        return (CUDA_SUCCESS,)

    # ---- modules
    def cuModuleLoadData(self, image):
        """Any image loads: the emulator library was built from every kernel source."""
        if not isinstance(image, (bytes, bytearray)) or not image:
            return (CUDA_ERROR_INVALID_VALUE, None)
        self._modules.append(_Module(bytes(image)))
        return (CUDA_SUCCESS, len(self._modules) - 1)

    def _module(self, handle) -> Optional[_Module]:
        if not isinstance(handle, int) or not 0 <= handle < len(self._modules):
            return None
        return self._modules[handle]

    def cuModuleGetFunction(self, module, name: bytes):
        mod = self._module(module)
        if mod is None:
            return (CUDA_ERROR_INVALID_HANDLE, None)
        kernel = name.decode()
        if kernel not in mod.functions:
            lib = self._library()
            try:
                address = ctypes.cast(getattr(lib, kernel), ctypes.c_void_p).value
                threads, smem = (ctypes.c_int * 2).in_dll(lib, f"{kernel}_launch")
            except (AttributeError, ValueError):
                return (CUDA_ERROR_NOT_FOUND, None)
            mod.functions[kernel] = EmulatedFunction(kernel, address, int(threads), int(smem))
        return (CUDA_SUCCESS, mod.functions[kernel])

    def cuModuleGetGlobal(self, module, name: bytes):
        if self._module(module) is None:
            return (CUDA_ERROR_INVALID_HANDLE, None, 0)
        try:
            symbol = (ctypes.c_int * 2).in_dll(self._library(), name.decode())
        except ValueError:
            return (CUDA_ERROR_NOT_FOUND, None, 0)
        return (CUDA_SUCCESS, ctypes.addressof(symbol), ctypes.sizeof(symbol))

    def cuMemcpyDtoH(self, dst, src, count):
        ctypes.memmove(int(dst), int(src), int(count))
        return (CUDA_SUCCESS,)

    def cuFuncSetAttribute(self, function, attribute, value):
        if not isinstance(function, EmulatedFunction):
            return (CUDA_ERROR_INVALID_HANDLE,)
        if attribute != _FunctionAttribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES:
            return (CUDA_ERROR_INVALID_VALUE,)
        if not 0 <= int(value) <= _OPTIN_MAX_DYNAMIC_SMEM:
            return (CUDA_ERROR_INVALID_VALUE,)
        function.max_dynamic_smem = int(value)
        return (CUDA_SUCCESS,)

    # ---- the launch
    def cuLaunchKernel(self, f, grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_bytes,
                       stream, kernel_params, extra):
        if not isinstance(f, EmulatedFunction):
            return (CUDA_ERROR_INVALID_HANDLE,)
        if not isinstance(stream, CUstream):
            return (CUDA_ERROR_INVALID_HANDLE,)
        if min(grid_x, grid_y, grid_z, block_x, block_y, block_z) < 1 or block_x * block_y * block_z > 1024:
            return (CUDA_ERROR_INVALID_VALUE,)
        if shared_bytes > f.max_dynamic_smem:
            return (CUDA_ERROR_INVALID_VALUE,)  # the driver refuses more than the function's limit
        if block_x != f.threads or shared_bytes < f.smem:
            raise EmulatorError(
                f"{f.name} is written for {f.threads} threads and {f.smem} bytes of dynamic shared "
                f"memory; launched with {block_x} threads and {shared_bytes} bytes")
        if not isinstance(kernel_params, int) or kernel_params == 0:
            return (CUDA_ERROR_INVALID_VALUE,)
        if self._on_launch is not None:
            self._on_launch(dict(function=f.name, grid=(grid_x, grid_y, grid_z), block=(block_x, block_y, block_z),
                                 shared_bytes=shared_bytes, stream=int(stream), kernel_params=kernel_params,
                                 extra=extra, context=self.current_context))
        lib = self._library()
        error = ctypes.create_string_buffer(512)
        status = lib.sas_emu_launch_kernel(
            ctypes.c_void_p(f.address), grid_x, grid_y, grid_z, block_x, block_y, block_z, shared_bytes,
            ctypes.c_void_p(kernel_params), None if not extra else ctypes.c_void_p(extra), error, len(error))
        if status != 0:
            self.last_error = error.value.decode(errors="replace")
            raise EmulatorError(f"{f.name}: {self.last_error}")
        return (CUDA_SUCCESS,)
