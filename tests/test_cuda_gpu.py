"""On a GPU: the CUDA kernels against the float64 reference of the rounded inputs and
against the "torch" target (the PyTorch formulation), on random ragged shapes, every tile configuration (on sm_90 the
128x128 and 128x256 tiles of float16/bfloat16 run the wgmma.mma_async.sp kernels when the
dense operand's rows are 16-byte aligned, mma.sp otherwise), outputs poisoned with NaN
before each run."""
from __future__ import annotations

import pytest
import torch

from sas_compile.runtime import cuda as sas_cuda

ok, why = sas_cuda.available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=f"no usable CUDA GPU: {why}")]

from test_emulator import (  # noqa: E402  (shared float64 references and weight patterns)
    one_of_m_weight,
    rel_err,
    rounded,
    sas_reference,
    two_of_four_weight,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# hardware fp32 accumulation is not IEEE round-to-nearest: a looser bound, still far below
# the O(1) error of any fragment or metadata layout mistake
REL_TOL = 1e-4
SHAPES = [(37, 45, 29), (1000, 256, 300), (257, 130, 515), (3, 1, 5), (4096, 64, 96)]


def _poison():
    """Fill freed CUDA memory with NaN so an output element a kernel never writes shows up."""
    torch.full((1 << 26,), float("nan"), device="cuda")
    torch.cuda.synchronize()


CASES = [(dtype, tile) for dtype in DTYPES for tile in ["64x64", "128x128", "128x256"]
         if not (tile == "128x256" and dtype == torch.float32)]


@pytest.mark.parametrize("dtype,tile", CASES, ids=str)
@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sas_gemm_cuda(dtype, M, shape, tile):
    R, K, N = shape
    g = torch.Generator().manual_seed(R + K + N + M)
    x = torch.randn(R, K, generator=g).to(dtype)
    w = torch.randn(N, M * K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    _poison()
    out32 = sas_cuda.sas_gemm(x.cuda(), w.cuda(), bias.cuda(), M, out_dtype=torch.float32, tile=tile)
    torch.cuda.synchronize()
    assert rel_err(out32.cpu(), sas_reference(x, w, bias, M)) < REL_TOL
    _poison()
    out = sas_cuda.sas_gemm(x.cuda(), w.cuda(), bias.cuda(), M, tile=tile)
    assert out.dtype == dtype
    assert torch.equal(out.cpu(), out32.cpu().to(dtype))


@pytest.mark.parametrize("dtype,tile", CASES, ids=str)
@pytest.mark.parametrize("pattern", ["1:2", "1:4", "2:4"])
def test_sws_gemm_cuda(dtype, pattern, tile):
    packing = pytest.importorskip("sas_compile.runtime.packing")
    R, K, N = 300, 200, 170
    g = torch.Generator().manual_seed(7)
    dense = two_of_four_weight(N, K, g) if pattern == "2:4" else one_of_m_weight(N, K, int(pattern[2:]), g)
    dense = dense.to(dtype)
    x = torch.randn(R, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    packed = packing.pack_sws_weight(dense).to("cuda")
    _poison()
    out = sas_cuda.sws_gemm(x.cuda(), packed, bias.cuda(), out_dtype=torch.float32, tile=tile)
    ref = rounded(x) @ rounded(dense).T + bias.double()
    assert rel_err(out.cpu(), ref) < REL_TOL


def test_compress_kernel_cuda_matches_the_reference():
    """sas_compress on the GPU writes exactly what operands.compress_reference says."""
    from sas_compile.runtime.cuda import kernel_params, launch, operands

    g = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        for M in (2, 4):
            for R, K in [(37, 45), (300, 256)]:
                x = torch.randn(R, K, generator=g).to(dtype)
                x[0, :3] = torch.tensor([0.0, -0.0, float("inf")])
                step, op = kernel_params.prepare_compress(x.cuda(), M)
                plan = kernel_params.Plan([step], op.vals)
                launch.launch(plan)
                torch.cuda.synchronize()
                want = operands.compress_reference(x, M)
                view = torch.int16 if dtype != torch.float32 else torch.int32
                assert torch.equal(op.vals.cpu().view(view), want.vals.view(view)), (dtype, M, R, K)
                assert torch.equal(op.meta.cpu(), want.meta), (dtype, M, R, K)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_sas_matmul_cuda_matches_cpu(dtype):
    matmul = pytest.importorskip("sas_compile.runtime.matmul")
    x = torch.randn(4, 33, 77, device="cuda").to(dtype)
    w = torch.randn(65, 2 * 77, device="cuda").to(dtype)
    b = torch.randn(65, device="cuda").to(dtype)
    got = matmul.sas_matmul(x, w, b, M=2, target="cuda")
    want = matmul.sas_matmul(x.float(), w.float(), b.float(), M=2, target="torch")
    assert got.shape == want.shape
    # the cpu target multiplies unrounded fp32; the kernel rounds to fp16 output / tf32 operands
    assert rel_err(got.float().cpu(), want.double().cpu()) < 2e-3


def test_runs_on_the_current_stream():
    x = torch.randn(512, 256, device="cuda", dtype=torch.float16)
    w = torch.randn(384, 512, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = sas_cuda.sas_gemm(x, w, None, 2, out_dtype=torch.float32)
    stream.synchronize()
    assert rel_err(out.cpu(), sas_reference(x.cpu(), w.cpu(), None, 2)) < REL_TOL


def test_driver_sees_one_gemm_params_argument_per_kernel():
    """What the real driver reads from kernelParams: one argument, the kernel's struct."""
    import ctypes

    from sas_compile.runtime.cuda import launch, nvrtc_build
    from sas_compile.runtime.cuda.kernel_params import param_struct

    launcher = launch.cuda_launcher(torch.cuda.current_device())
    drv = launch.driver()
    if not hasattr(drv, "cuFuncGetParamInfo"):
        pytest.skip("cuda-python too old for cuFuncGetParamInfo (CUDA 12.4+)")
    arch = launch.device_arch(torch.cuda.current_device())
    for kernel in nvrtc_build.kernel_names():
        if nvrtc_build.module_of(kernel) not in nvrtc_build.modules_for(arch):
            continue
        fn = launcher.function(kernel)
        offset, size = launch.check(drv, drv.cuFuncGetParamInfo(fn.handle, 0), f"cuFuncGetParamInfo({kernel}, 0)")
        assert (int(offset), int(size)) == (0, ctypes.sizeof(param_struct(kernel))), kernel
        status = drv.cuFuncGetParamInfo(fn.handle, 1)[0]
        assert int(status) != 0, f"{kernel} has a second parameter"


def test_float32_sas_model_on_cuda_is_full_precision_by_default():
    """PyTorch's convention: without allow_tf32 a float32 model runs in full precision."""
    from torch import nn

    import sas_compile

    assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10)).cuda()
    sas = sas_compile.sasify(dense, M=2)
    x = torch.randn(512, 64, device="cuda")
    with torch.no_grad():
        ref = dense.double()(x.double())
        out = sas(x)
    assert rel_err(out.double().cpu(), ref.cpu()) < 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("M", [2, 4])
def test_sas_conv2d_on_cuda_matches_float64(M, dtype, channels_last):
    from sas_compile.runtime import autotune
    from sas_compile.runtime.projection import project

    g = torch.Generator().manual_seed(M)
    for (n, c, h, w), (co, k, stride, pad, dil) in [((4, 16, 15, 13), (24, 3, 1, 1, 1)),
                                                    ((2, 10, 9, 9), (8, 3, 2, 2, 2)),
                                                    ((3, 32, 7, 7), (32, 1, 1, 0, 1))]:
        x = torch.randn(n, c, h, w, generator=g)
        weight = torch.randn(co, M * c, k, k, generator=g) / (M * c * k * k) ** 0.5
        bias = torch.randn(co, generator=g)
        ref = torch.nn.functional.conv2d(project(x.to(dtype).double(), M, 1), weight.to(dtype).double(),
                                         bias.to(dtype).double(), stride, pad, dil)
        xc = x.to(dtype).cuda()
        if channels_last:
            xc = xc.contiguous(memory_format=torch.channels_last)
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            out = torch.ops.sas.conv2d(xc, weight.to(dtype).cuda(), bias.to(dtype).cuda(), [stride] * 2,
                                       [pad] * 2, [dil] * 2, 1, M, "sign_pattern")
        assert out.shape == ref.shape
        assert rel_err(out.cpu(), ref) < (2e-3 if dtype == torch.float16 else 1e-5)
    assert any(d.op == "sas_conv2d" for d in autotune.decisions()) or dtype == torch.float32


def test_backend_sas_on_cuda_lowers_and_matches_eager(capsys):
    from torch import nn

    import sas_compile
    from sas_compile.backend import sas_backend

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).cuda().eval()
    sas = sas_compile.sasify(dense, M=2).cuda().eval()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    torch._dynamo.reset()
    backend = lambda gm, inputs: sas_backend(gm, inputs, options={"explain": True})  # noqa: E731
    with torch.no_grad():
        got, want = torch.compile(sas, backend=backend)(x), sas(x)
        got_dense = torch.compile(dense, backend=backend)(x)
    assert rel_err(got.double().cpu(), want.double().cpu()) < 1e-4
    assert rel_err(got_dense.double().cpu(), dense(x).double().cpu()) < 1e-4
    out = capsys.readouterr().out
    # the two SAS convs (and the linear unless a kernel measured faster) of each model
    assert out.count("written as projection + dense ops") >= 2, out
