"""The CUDA target's host-side launch, run without a GPU.

``runtime/cuda/launch.py`` is driven with a recording fake of ``cuda.bindings.driver``
(the emulator's driver, which runs the kernels on the host): what ``cuLaunchKernel``
receives must decode, as the driver decodes it, to the prepared parameter struct of that
kernel (``CompressParams`` or ``SpGemmParams``), with the grid, block and shared-memory
sizes the cubin publishes and PyTorch's current stream. Every kernel's parameter block in
the cubin (``.nv.info``) is exactly its ctypes mirror, and the emulator registers each
kernel with the same struct. The first GPU run faulted at every launch because this code
had never run anywhere.
"""
from __future__ import annotations

import ctypes
import os
import struct
from types import SimpleNamespace

import pytest
import torch

from sas_compile.runtime import emulator
from sas_compile.runtime.cuda import cubin, nvrtc_build
from sas_compile.runtime.cuda import launch as launch_mod
from sas_compile.runtime.cuda.kernel_params import (CompressParams, SpGemmParams, param_struct, prepare_sas,
                                                    prepare_sws)
from sas_compile.runtime.emulator.driver import EmulatorDriver

if not os.environ.get("CI"):  # in CI (CI=true) a missing NVRTC is a failure, not a skip
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (the 'cuda' extra) is not installed")

from test_emulator import one_of_m_weight, rel_err, rounded, sas_reference  # noqa: E402

STREAM = 0x5EED0
STRUCTS = {"SpGemmParams": SpGemmParams, "CompressParams": CompressParams}


def fields(struct_type) -> list:
    return [name for name, _ in struct_type._fields_]


def decode_kernel_params(address: int, struct_type):
    """What the driver reads for a kernel with one struct argument: kernelParams[0]'s bytes."""
    entry = (ctypes.c_void_p * 1).from_address(address)[0]
    return struct_type.from_buffer_copy(ctypes.string_at(entry, ctypes.sizeof(struct_type)))


def params_tuple(p) -> tuple:
    return tuple(getattr(p, name) or 0 for name in fields(type(p)))


class RecordingDriver(EmulatorDriver):
    """The emulator's driver, recording every call; globals are read from the loaded cubin,
    as the real driver reads them, and each launch is checked before the kernel runs."""

    def __init__(self):
        super().__init__(emulator._library, on_launch=self._check_launch)
        self.expect = []
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
        kernel = record["function"]
        got = params_tuple(decode_kernel_params(record["kernel_params"], param_struct(kernel)))
        record["params"] = got
        want = self.expect[len(self.launches)]
        self.launches.append(record)
        assert (kernel, got) == want, f"kernelParams decode to {(kernel, got)}, prepared {want}"


@pytest.fixture
def fake_gpu(monkeypatch):
    """PyTorch's CUDA queries answered as on an sm_90 device 0 whose current stream is STREAM."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=STREAM))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def _launch(plan, fake):
    fake.expect = [(launch.kernel, params_tuple(launch.params)) for launch in plan.launches]
    return launch_mod.launch(plan, api=fake)


def _published(image: bytes, kernel: str):
    return struct.unpack("<2i", cubin.symbol_bytes(image, f"{kernel}_launch"))


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_param_struct_mirrors_match_the_cpp_structs(name):
    struct_type = STRUCTS[name]
    layout = emulator.struct_layout(name)
    assert layout[0] == ctypes.sizeof(struct_type)
    assert list(layout[1:]) == [getattr(struct_type, f).offset for f in fields(struct_type)]


def test_every_kernel_is_registered_with_its_struct():
    registry = emulator.kernel_registry()
    assert set(registry) == set(nvrtc_build.kernel_names())
    for kernel, (struct_name, size) in registry.items():
        mirror = param_struct(kernel)
        assert struct_name == mirror.__name__ and size == ctypes.sizeof(mirror), kernel


def test_kernels_map_to_their_modules_explicitly():
    for module in nvrtc_build.MODULES:
        names = nvrtc_build.kernel_names(module)
        assert names, module
        assert all(nvrtc_build.module_of(k) == module for k in names)
    with pytest.raises(KeyError):
        nvrtc_build.module_of("sas_gemm_f16_m2_64x64")  # the old fused kernel is gone


def test_gemm_shared_memory_table_matches_the_cubins():
    from sas_compile.runtime.cuda import kernel_params

    for module, arch in (("spmma", "sm_80"), ("spwgmma", "sm_90")):
        image = nvrtc_build.build_module(module, arch).cubin
        for kernel in nvrtc_build.kernel_names(module):
            family, _, tile, _ = kernel.split("_")
            assert _published(image, kernel)[1] == kernel_params.GEMM_SMEM[(family, tile)], kernel
    x, w = torch.randn(8, 16).half(), torch.randn(8, 32).half()
    with pytest.raises(ValueError, match="99 KiB"):
        prepare_sas(x, w, None, 2, tile="128x256", arch="sm_89")
    assert prepare_sas(x, w, None, 2, tile="128x256", arch="sm_80").gemm.kernel == "spmma_f16_128x256_sas"


def test_kernel_params_entry_is_the_struct_address():
    params = SpGemmParams(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14)
    array = launch_mod.kernel_params(params)
    assert array[0] == ctypes.addressof(params)
    assert params_tuple(decode_kernel_params(ctypes.addressof(array), SpGemmParams)) == params_tuple(params)


@pytest.mark.parametrize("module,arch", [("sas_compress", "sm_80"), ("spmma", "sm_80"), ("spmma", "sm_90"),
                                         ("spwgmma", "sm_90")])
def test_cubin_parameter_block_is_the_ctypes_mirror(module, arch):
    image = nvrtc_build.build_module(module, arch).cubin
    for kernel in nvrtc_build.kernel_names(module):
        size = ctypes.sizeof(param_struct(kernel))
        assert cubin.kernel_parameters(image, kernel) == [(0, 0, size)], kernel


@pytest.mark.parametrize("dtype,tile", [(torch.float16, "64x64"), (torch.float16, "128x128"),
                                        (torch.float16, "128x256"), (torch.float32, "64x64"),
                                        (torch.float32, "128x128")], ids=str)
def test_sas_launches_through_a_fake_driver(fake_gpu, tile, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 40, generator=g).to(dtype)
    w = torch.randn(29, 2 * 40, generator=g).to(dtype)
    b = torch.randn(29, generator=g).to(dtype)
    fake = RecordingDriver()
    fake.current_context = "the caller's context"  # e.g. another device's, current in this thread
    plan = prepare_sas(x, w, b, 2, out_dtype=torch.float32, tile=tile, arch="sm_90")
    out = _launch(plan, fake)

    assert [r["function"] for r in fake.launches] == [launch.kernel for launch in plan.launches]
    assert plan.launches[0].kernel == f"sas_compress_{'f16' if dtype == torch.float16 else 'f32'}_m2"
    assert plan.gemm.kernel.startswith("spwgmma_" if dtype == torch.float16 and tile != "64x64" else "spmma_")
    assert len(fake.images) == 2  # compress module, GEMM module: real NVRTC cubins for sm_90(a)
    for record, launch, image in zip(fake.launches, plan.launches, fake.images):
        assert image[:4] == b"\x7fELF"
        threads, smem = _published(image, launch.kernel)
        assert record["grid"] == (*launch.grid, 1)
        assert record["block"] == (threads, 1, 1)
        assert record["shared_bytes"] == smem
        assert record["stream"] == STREAM
        assert not record["extra"]
        if smem > launch_mod.STATIC_SMEM_LIMIT:
            assert "cuFuncSetAttribute" in fake.calls
    assert fake.calls[:3] == ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain"]
    assert fake.calls[fake.calls.index("cuLaunchKernel") - 1] == "cuCtxSetCurrent"
    # every launch in the device's primary context, the caller's context current again after
    assert {record["context"] for record in fake.launches} == {("emulator-context", 0)}
    assert fake.current_context == "the caller's context"
    assert rel_err(out, sas_reference(x, w, b, 2)) < 1e-5


def test_sws_launch_through_a_fake_driver(fake_gpu):
    from sas_compile.runtime.packing import pack_sws_weight

    g = torch.Generator().manual_seed(5)
    dense = one_of_m_weight(33, 72, 2, g).half()
    x = torch.randn(21, 72, generator=g).half()
    packed = pack_sws_weight(dense)
    fake = RecordingDriver()
    plan = prepare_sws(x, packed, None, out_dtype=torch.float32, arch="sm_90")
    out = _launch(plan, fake)
    (record,) = fake.launches
    assert record["function"] == "spwgmma_f16_128x128_sws"
    assert record["stream"] == STREAM and record["grid"] == (*plan.gemm.grid, 1)
    assert rel_err(out, rounded(x) @ rounded(dense).T) < 1e-5


def test_the_fake_driver_catches_a_pointer_to_the_struct(fake_gpu, monkeypatch):
    """The bug of the first GPU run: kernelParams[0] pointed at a pointer to the struct."""
    def pointer_to_pointer(params):
        holder = ctypes.c_void_p(ctypes.addressof(params))
        array = (ctypes.c_void_p * 1)(ctypes.addressof(holder))
        array._holder = holder
        return array

    monkeypatch.setattr(launch_mod, "kernel_params", pointer_to_pointer)
    x, w = torch.randn(8, 16).half(), torch.randn(8, 32).half()
    with pytest.raises(AssertionError, match="kernelParams decode to"):
        _launch(prepare_sas(x, w, None, 2, tile="64x64"), RecordingDriver())


def test_emulator_refuses_large_shared_memory_without_the_attribute():
    from sas_compile.runtime.cuda.launch import CudaError, Launcher

    api = EmulatorDriver(emulator._library)
    api.cuFuncSetAttribute = lambda *args: (0,)  # the limit is never raised
    launcher = Launcher(api, lambda module: module.encode())
    x, w = torch.randn(8, 16).half(), torch.randn(8, 32).half()
    plan = prepare_sas(x, w, None, 2, tile="128x128")  # 75 KiB of dynamic shared memory
    with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_VALUE"):
        launch_mod.run(launcher, plan, 0)


def test_empty_operand_launches_nothing(fake_gpu):
    fake = RecordingDriver()
    bias = torch.randn(7).half()
    out = _launch(prepare_sas(torch.randn(0, 16).half(), torch.randn(7, 32).half(), bias, 2), fake)
    assert out.shape == (0, 7) and "cuLaunchKernel" not in fake.calls
    out = _launch(prepare_sas(torch.randn(3, 0).half(), torch.randn(7, 0).half(), bias, 2), fake)
    assert torch.equal(out, bias.expand(3, 7)) and "cuLaunchKernel" not in fake.calls
