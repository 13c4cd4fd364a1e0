"""The CUDA target's host-side launch, run without a GPU.

``runtime/cuda/launch.py`` is driven with a recording fake of ``cuda.bindings.driver``
(the emulator's driver, which runs the kernels on the host): what ``cuLaunchKernel``
receives must decode, as the driver decodes it, to the prepared ``GemmParams``, with the
grid, block and shared-memory sizes the cubin publishes and PyTorch's current stream.
The first GPU run faulted at every launch because this code had never run anywhere.
"""
from __future__ import annotations

import ctypes
import os
import struct
from types import SimpleNamespace

import pytest
import torch

from sas_compile.runtime import emulator
from sas_compile.runtime.cuda import cubin
from sas_compile.runtime.cuda import launch as launch_mod
from sas_compile.runtime.cuda.kernel_params import GemmParams, prepare_sas, prepare_sws
from sas_compile.runtime.emulator.driver import EmulatorDriver

if not os.environ.get("CI"):  # in CI (CI=true) a missing NVRTC is a failure, not a skip
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (the 'cuda' extra) is not installed")

from test_emulator import one_of_m_weight, rel_err, rounded, sas_reference  # noqa: E402

STREAM = 0x5EED0
FIELDS = [name for name, _ in GemmParams._fields_]


def decode_kernel_params(address: int) -> GemmParams:
    """What the driver reads for a kernel with one GemmParams argument: kernelParams[0]'s bytes."""
    entry = (ctypes.c_void_p * 1).from_address(address)[0]
    return GemmParams.from_buffer_copy(ctypes.string_at(entry, ctypes.sizeof(GemmParams)))


def params_tuple(p: GemmParams) -> tuple:
    return tuple(getattr(p, name) or 0 for name in FIELDS)


class RecordingDriver(EmulatorDriver):
    """The emulator's driver, recording every call; globals are read from the loaded cubin,
    as the real driver reads them, and each launch is checked before the kernel runs."""

    def __init__(self, expect: dict):
        super().__init__(emulator._library, on_launch=self._check_launch)
        self.expect = expect
        self.calls, self.launches, self.images, self._buffers = [], [], [], []

    def __getattribute__(self, name):
        value = object.__getattribute__(self, name)
        if name.startswith("cu") and callable(value):
            object.__getattribute__(self, "calls").append(name)
        return value

    def cuModuleLoadData(self, image):
        self.images.append(image)
        return super().cuModuleLoadData(image)

    def cuModuleGetGlobal(self, module, name):
        data = cubin.symbol_bytes(self._modules[module].image, name.decode())
        buffer = ctypes.create_string_buffer(data, len(data))
        self._buffers.append(buffer)
        return (0, ctypes.addressof(buffer), len(data))

    def _check_launch(self, record):
        # decode first and refuse to run a launch whose arguments are wrong (it would fault)
        got = params_tuple(decode_kernel_params(record["kernel_params"]))
        record["params"] = got
        self.launches.append(record)
        assert got == self.expect["params"], f"kernelParams decode to {got}, prepared {self.expect['params']}"


@pytest.fixture
def fake_gpu(monkeypatch):
    """PyTorch's CUDA queries answered as on an sm_90 device 0 whose current stream is STREAM."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=STREAM))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def _launch(prepared, fake):
    fake.expect["params"] = params_tuple(prepared.params)
    return launch_mod.launch(prepared, api=fake)


def _published(image: bytes, kernel: str):
    return struct.unpack("<2i", cubin.symbol_bytes(image, f"{kernel}_launch"))


def test_gemm_params_mirror_matches_the_cpp_struct():
    layout = emulator.gemm_params_layout()
    assert layout[0] == ctypes.sizeof(GemmParams)
    assert list(layout[1:]) == [getattr(GemmParams, name).offset for name in FIELDS]


def test_kernel_params_entry_is_the_struct_address():
    params = GemmParams(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    array = launch_mod.kernel_params(params)
    assert array[0] == ctypes.addressof(params)
    assert params_tuple(decode_kernel_params(ctypes.addressof(array))) == params_tuple(params)


@pytest.mark.parametrize("module", ["sas_gemm", "sws_gemm"])
def test_cubin_kernels_take_one_gemm_params_by_value(module):
    from sas_compile.runtime.cuda import nvrtc_build

    image = nvrtc_build.build_module(module, "sm_90").cubin
    for kernel in nvrtc_build.kernel_names(module):
        assert cubin.kernel_parameters(image, kernel) == [(0, 0, ctypes.sizeof(GemmParams))], kernel


@pytest.mark.parametrize("tile", ["64x64", "128x128"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_sas_launch_through_a_fake_driver(fake_gpu, tile, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 45, generator=g).to(dtype)
    w = torch.randn(29, 2 * 45, generator=g).to(dtype)
    b = torch.randn(29, generator=g).to(dtype)
    fake = RecordingDriver({})
    prepared = prepare_sas(x, w, b, 2, out_dtype=torch.float32, tile=tile)
    out = _launch(prepared, fake)

    assert len(fake.launches) == 1
    record = fake.launches[0]
    image = fake.images[0]
    assert image[:4] == b"\x7fELF"  # the real NVRTC cubin for sm_90 was handed to the driver
    threads, smem = _published(image, prepared.kernel)
    assert record["function"] == prepared.kernel
    assert record["grid"] == (*prepared.grid, 1)
    assert record["block"] == (threads, 1, 1)
    assert record["shared_bytes"] == smem
    assert record["stream"] == STREAM
    assert not record["extra"]
    if smem > launch_mod.STATIC_SMEM_LIMIT:
        assert fake.calls.index("cuFuncSetAttribute") < fake.calls.index("cuLaunchKernel")
    assert fake.calls[:3] == ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain"]
    assert fake.calls[fake.calls.index("cuLaunchKernel") - 1] == "cuCtxSetCurrent"
    assert rel_err(out, sas_reference(x, w, b, 2)) < 1e-5


def test_sws_launch_through_a_fake_driver(fake_gpu):
    from sas_compile.runtime.packing import pack_sws_weight

    g = torch.Generator().manual_seed(5)
    dense = one_of_m_weight(33, 70, 2, g).half()
    x = torch.randn(21, 70, generator=g).half()
    packed = pack_sws_weight(dense)
    fake = RecordingDriver({})
    prepared = prepare_sws(x, packed, None, out_dtype=torch.float32, tile="64x64")
    out = _launch(prepared, fake)
    (record,) = fake.launches
    assert record["stream"] == STREAM and record["grid"] == (*prepared.grid, 1)
    assert rel_err(out, rounded(x) @ rounded(dense).T) < 1e-5


def test_the_fake_driver_catches_a_pointer_to_the_struct(fake_gpu, monkeypatch):
    """The bug of the first GPU run: kernelParams[0] pointed at a pointer to GemmParams."""
    def pointer_to_pointer(params):
        holder = ctypes.c_void_p(ctypes.addressof(params))
        array = (ctypes.c_void_p * 1)(ctypes.addressof(holder))
        array._holder = holder
        return array

    monkeypatch.setattr(launch_mod, "kernel_params", pointer_to_pointer)
    x, w = torch.randn(8, 16).half(), torch.randn(8, 32).half()
    with pytest.raises(AssertionError, match="kernelParams decode to"):
        _launch(prepare_sas(x, w, None, 2, tile="64x64"), RecordingDriver({}))


def test_emulator_refuses_large_shared_memory_without_the_attribute():
    from sas_compile.runtime.cuda.launch import CudaError, Launcher

    api = EmulatorDriver(emulator._library)
    api.cuFuncSetAttribute = lambda *args: (0,)  # the limit is never raised
    launcher = Launcher(api, lambda module: module.encode())
    x, w = torch.randn(8, 16).half(), torch.randn(8, 32).half()
    prepared = prepare_sas(x, w, None, 2, tile="128x128")
    with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_VALUE"):
        launch_mod.run(launcher, prepared, 0)


def test_empty_operand_launches_nothing(fake_gpu):
    fake = RecordingDriver({})
    bias = torch.randn(7).half()
    out = _launch(prepare_sas(torch.randn(0, 16).half(), torch.randn(7, 32).half(), bias, 2), fake)
    assert out.shape == (0, 7) and "cuLaunchKernel" not in fake.calls
