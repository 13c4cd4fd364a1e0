"""The CUDA kernels run in the host emulator and agree with a float64 reference of the
rounded inputs; the emulator's mma.sp reading of the PTX layout matches LLVM's known answer."""
from __future__ import annotations

import os

import pytest
import torch

from sas_compile.runtime import emulator
from sas_compile.runtime.projection import project

ok, why = emulator.available()
# CI (CI=true) must run the kernels: there a missing host compiler is a failure, not a skip
pytestmark = pytest.mark.skipif(not ok and not os.environ.get("CI"), reason=why)


def test_emulator_is_available():
    assert ok, why

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REL_TOL = 1e-5


def tf32_round(t: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32 in torch: keep 10 mantissa bits, ties away from zero."""
    bits = t.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign = bits & 0x80000000
    mag = ((bits & 0x7FFFFFFF) + 0x1000) & 0x7FFFE000
    out = (sign | mag).to(torch.int64)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.view(torch.float32)


def rounded(t: torch.Tensor) -> torch.Tensor:
    """The operand values the tensor core multiplies, in float64."""
    return (tf32_round(t) if t.dtype == torch.float32 else t).double()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def sas_reference(x, w, b, M):
    out = project(rounded(x), M) @ rounded(w).T
    return out + b.double() if b is not None else out


# (R, K, N): odd K (element loads), aligned K (16-byte cp.async), tiny, several tiles
SAS_SHAPES = [(37, 45, 29), (70, 64, 67), (3, 1, 5), (9, 24, 130)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("shape", SAS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sas_gemm_matches_reference(dtype, M, shape):
    R, K, N = shape
    g = torch.Generator().manual_seed(R * 1000 + K * 10 + N + M)
    x = torch.randn(R, K, generator=g).to(dtype)
    w = torch.randn(N, M * K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if (R + M) % 2 else None
    out32 = emulator.sas_gemm(x, w, bias, M, out_dtype=torch.float32)
    assert out32.dtype == torch.float32 and out32.shape == (R, N)
    assert rel_err(out32, sas_reference(x, w, bias, M)) < REL_TOL
    # the kernel's own output is the fp32 accumulator rounded once to x's dtype
    out = emulator.sas_gemm(x, w, bias, M)
    assert out.dtype == dtype
    assert torch.equal(out, out32.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_sas_gemm_large_tile(dtype):
    R, K, N = 130, 40, 140
    x = torch.randn(R, K).to(dtype)
    w = torch.randn(N, 2 * K).to(dtype)
    bias = torch.randn(N).to(dtype)
    out = emulator.sas_gemm(x, w, bias, 2, out_dtype=torch.float32, tile="128x128")
    assert rel_err(out, sas_reference(x, w, bias, 2)) < REL_TOL


def test_sas_gemm_zeros_follow_the_index_rule():
    # exact zeros and a partner at +0 decide the M = 4 slot (x <= 0 counts as nonpositive)
    x = torch.tensor([[0.0, -1.5, 2.0, 0.0, -0.0, 3.0, 1.0]]).repeat(5, 1)
    x[1:] = torch.randn(4, 7)
    w = torch.randn(6, 4 * 7)
    for dtype in DTYPES:
        xd, wd = x.to(dtype), w.to(dtype)
        out = emulator.sas_gemm(xd, wd, None, 4, out_dtype=torch.float32)
        assert rel_err(out, sas_reference(xd, wd, None, 4)) < REL_TOL


def test_batched_leading_dims_through_sas_matmul():
    matmul = pytest.importorskip("sas_compile.runtime.matmul")
    x = torch.randn(2, 3, 5, 20, dtype=torch.float16)
    w = torch.randn(11, 2 * 20, dtype=torch.float16)
    b = torch.randn(11, dtype=torch.float16)
    out = matmul.sas_matmul(x, w, b, M=2, target="emulator")
    assert out.shape == (2, 3, 5, 11) and out.dtype == torch.float16
    ref = sas_reference(x.reshape(-1, 20), w, b, 2).reshape(2, 3, 5, 11)
    assert rel_err(out, ref) < 2e-3  # one float16 rounding of the output


# ---- SWS -------------------------------------------------------------------------------
packing = pytest.importorskip("sas_compile.runtime.packing")


def one_of_m_weight(N, K, M, generator):
    """A weight with one nonzero per M consecutive columns of each row."""
    w = torch.randn(N, K, generator=generator)
    keep = torch.zeros(N, K, dtype=torch.bool)
    for start in range(0, K, M):
        width = min(M, K - start)
        pos = start + torch.randint(0, width, (N,), generator=generator)
        keep[torch.arange(N), pos] = True
    return w * keep


def two_of_four_weight(N, K, generator):
    """Any 2:4 pattern, including both entries inside one pair (the tf32 split path)."""
    w = torch.randn(N, K, generator=generator)
    keep = torch.zeros(N, K, dtype=torch.bool)
    for start in range(0, K, 4):
        width = min(4, K - start)
        order = torch.rand(N, width, generator=generator).argsort(-1)[:, : min(2, width)]
        keep[torch.arange(N)[:, None], start + order] = True
    return w * keep


SWS_CASES = [("1:2", 37, 40, 29), ("1:4", 20, 64, 70), ("2:4", 33, 37, 18), ("1:2", 2, 7, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SWS_CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}x{c[3]}")
def test_sws_gemm_matches_reference(dtype, case):
    pattern, R, K, N = case
    g = torch.Generator().manual_seed(R + K + N)
    if pattern == "2:4":
        dense = two_of_four_weight(N, K, g)
    else:
        dense = one_of_m_weight(N, K, int(pattern[2:]), g)
    dense = dense.to(dtype)
    packed = packing.pack_sws_weight(dense)
    x = torch.randn(R, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if R % 2 else None
    out32 = emulator.sws_gemm(x, packed, bias, out_dtype=torch.float32)
    ref = rounded(x) @ rounded(dense).T
    if bias is not None:
        ref = ref + bias.double()
    assert rel_err(out32, ref) < REL_TOL
    assert torch.equal(emulator.sws_gemm(x, packed, bias), out32.to(dtype))


# ---- the emulator's own reading of the mma.sp spec --------------------------------------
def test_mma_sp_known_answer_from_llvm():
    # LLVM mlir/test/Integration/Dialect/SparseTensor/GPU/CUDA/sparse-mma-2-4-f16.mlir:
    # compressed A[i][j] = i + j + 1 kept at positions 0 and 2 of every group (0x8888),
    # B[n][k] = n - k (column-major), C = A x B
    i = torch.arange(16)
    a = (i[:, None] + i[None, :] + 1).half()
    meta = torch.full((16, 2), 0x8888 - 0x10000, dtype=torch.int16)
    n, k = torch.arange(8), torch.arange(32)
    b = (n[:, None] - k[None, :]).half()
    c = emulator.mma_sp_probe_f16(a, meta, b)
    expected_first = torch.tensor([-2720, -2584, -2448, -2312, -2176, -2040, -1904, -1768.0])
    expected_row8 = torch.tensor([-4640, -4376, -4112, -3848, -3584, -3320, -3056, -2792.0])
    expected_last = torch.tensor([-6320, -5944, -5568, -5192, -4816, -4440, -4064, -3688.0])
    assert torch.equal(c[0], expected_first)
    assert torch.equal(c[8], expected_row8)
    assert torch.equal(c[15], expected_last)
    # every row of the published table: C[i][n] = sum_c (i + c + 1) * (n - 2c)
    cc = torch.arange(16.0)
    full = ((i[:, None, None] + cc[None, None, :] + 1) * (n[None, :, None] - 2 * cc[None, None, :])).sum(-1)
    assert torch.equal(c, full.float())


def test_mma_sp_rejects_invalid_metadata():
    a = torch.ones(16, 16, dtype=torch.float16)
    b = torch.ones(8, 32, dtype=torch.float16)
    meta = torch.zeros(16, 2, dtype=torch.int16)  # indices (0, 0): undefined on hardware
    with pytest.raises(emulator.EmulatorError, match="invalid metadata"):
        emulator.mma_sp_probe_f16(a, meta, b)


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight must be the wide"):
        emulator.sas_gemm(x, torch.randn(3, 8), None, 2)
    with pytest.raises(ValueError, match="M=8"):
        emulator.sas_gemm(x, torch.randn(3, 64), None, 8)
    with pytest.raises(TypeError, match="bias has dtype"):
        emulator.sas_gemm(x, torch.randn(3, 16), torch.randn(3, dtype=torch.float64), 2)
    with pytest.raises(TypeError, match="weight has dtype"):
        emulator.sas_gemm(x, torch.randn(3, 16).half(), None, 2)
