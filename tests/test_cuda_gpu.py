"""On a GPU: the CUDA kernels against the float64 reference of the rounded inputs and
against the "cpu" target, on random ragged shapes, both tile configurations."""
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tile", ["64x64", "128x128"])
def test_sas_gemm_cuda(dtype, M, shape, tile):
    R, K, N = shape
    g = torch.Generator().manual_seed(R + K + N + M)
    x = torch.randn(R, K, generator=g).to(dtype)
    w = torch.randn(N, M * K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    out32 = sas_cuda.sas_gemm(x.cuda(), w.cuda(), bias.cuda(), M, out_dtype=torch.float32, tile=tile)
    torch.cuda.synchronize()
    assert rel_err(out32.cpu(), sas_reference(x, w, bias, M)) < REL_TOL
    out = sas_cuda.sas_gemm(x.cuda(), w.cuda(), bias.cuda(), M, tile=tile)
    assert out.dtype == dtype
    assert torch.equal(out.cpu(), out32.cpu().to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["1:2", "1:4", "2:4"])
@pytest.mark.parametrize("tile", ["64x64", "128x128"])
def test_sws_gemm_cuda(dtype, pattern, tile):
    packing = pytest.importorskip("sas_compile.runtime.packing")
    R, K, N = 300, 200, 170
    g = torch.Generator().manual_seed(7)
    dense = two_of_four_weight(N, K, g) if pattern == "2:4" else one_of_m_weight(N, K, int(pattern[2:]), g)
    dense = dense.to(dtype)
    x = torch.randn(R, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    packed = packing.pack_sws_weight(dense).to("cuda")
    out = sas_cuda.sws_gemm(x.cuda(), packed, bias.cuda(), out_dtype=torch.float32, tile=tile)
    ref = rounded(x) @ rounded(dense).T + bias.double()
    assert rel_err(out.cpu(), ref) < REL_TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_sas_matmul_cuda_matches_cpu(dtype):
    matmul = pytest.importorskip("sas_compile.runtime.matmul")
    x = torch.randn(4, 33, 77, device="cuda").to(dtype)
    w = torch.randn(65, 2 * 77, device="cuda").to(dtype)
    b = torch.randn(65, device="cuda").to(dtype)
    got = matmul.sas_matmul(x, w, b, M=2, target="cuda")
    want = matmul.sas_matmul(x.float(), w.float(), b.float(), M=2, target="cpu")
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
