"""The CUDA kernels run in the host emulator and agree with a float64 reference of the
rounded inputs on ragged shapes; the compress kernel writes exactly the documented operand;
shared-memory accesses are free of bank conflicts; the emulator's own reading of mma.sp and
wgmma.mma_async.sp matches known answers built from LLVM's test and the PTX ISA's tables.

Every run poisons its outputs (and the compressed operand) first, so an element a kernel
does not write fails the comparison."""
from __future__ import annotations

import os

import pytest
import torch

from sas_compile.runtime import emulator
from sas_compile.runtime.cuda import kernel_params as kp
from sas_compile.runtime.cuda import operands
from sas_compile.runtime.projection import project, reference_project

ok, why = emulator.available()
# CI (CI=true) must run the kernels: there a missing host compiler is a failure, not a skip
pytestmark = pytest.mark.skipif(not ok and not os.environ.get("CI"), reason=why)


def test_emulator_is_available():
    assert ok, why


DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REL_TOL = 1e-5


def tf32_round(t: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32 in torch: keep 10 mantissa bits, round to nearest, ties away from zero
    (the magnitude rounds up at exactly half an ulp); inf and NaN are returned as they are.

    Written apart from ``operands.tf32_round`` (which pre-rounds the float32 operands the
    kernels read), so a rounding mistake there does not cancel out of the references below:
    the 13 dropped mantissa bits are compared with half a tf32 ulp one by one."""
    bits = t.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign = bits & 0x80000000
    magnitude = bits & 0x7FFFFFFF
    dropped = magnitude & 0x1FFF  # the 13 low mantissa bits tf32 does not keep
    kept = magnitude - dropped
    # half an ulp (0x1000) or more rounds the magnitude up; a carry into the exponent is the
    # right answer (up to +-inf past the largest tf32 value)
    magnitude = torch.where(dropped >= 0x1000, kept + 0x2000, kept)
    finite = (bits & 0x7F800000) != 0x7F800000
    out = torch.where(finite, sign | magnitude, bits)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.view(torch.float32)


# float32 bits -> tf32 bits under round to nearest, ties away from zero (hand-worked)
TF32_KNOWN_ANSWERS = [
    (0x3F800000, 0x3F800000),  # 1.0
    (0x3F801000, 0x3F802000),  # 1 + 2^-11: a tie, away from zero (to nearest even would give 1.0)
    (0xBF801000, 0xBF802000),  # its negative: the magnitude rounds up too
    (0x3F803000, 0x3F804000),  # 1 + 3 * 2^-11: a tie whose lower neighbour is odd
    (0x3F800FFF, 0x3F800000),  # just below the tie: down
    (0xBF800FFF, 0xBF800000),
    (0x3F801001, 0x3F802000),  # just above the tie: up
    (0x3F7FFFFF, 0x3F800000),  # 0.99999994: up into the next exponent, 1.0
    (0xBFFFF000, 0xC0000000),  # -(2 - 2^-11): a tie carried into the exponent, -2.0
    (0x3DCCCCCD, 0x3DCCC000),  # 0.1
    (0xC0490FDB, 0xC0490000),  # -pi
    (0x7F7FEFFF, 0x7F7FE000),  # largest tf32 value
    (0x7F7FFFFF, 0x7F800000),  # the largest float32 is past its half ulp: +inf
    (0xFF7FF000, 0xFF800000),  # a tie at the top: -inf
    (0x00001000, 0x00002000),  # a subnormal tie
    (0x80000FFF, 0x80000000),  # a negative subnormal below the tie: -0.0
    (0x00000000, 0x00000000), (0x80000000, 0x80000000),  # +-0
    (0x7F800000, 0x7F800000), (0xFF800000, 0xFF800000),  # +-inf
]


def _from_bits(values) -> torch.Tensor:
    b = torch.tensor(values, dtype=torch.int64)
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def _bits(t: torch.Tensor) -> list:
    return [v & 0xFFFFFFFF for v in t.contiguous().view(torch.int32).tolist()]


def test_tf32_round_known_answers_and_agreement_with_operands():
    """The reference above and ``operands.tf32_round`` (the kernels' pre-rounding) against
    hand-worked answers, then against each other on every class of float32 bit pattern."""
    x = _from_bits([a for a, _ in TF32_KNOWN_ANSWERS])
    want = [b for _, b in TF32_KNOWN_ANSWERS]
    assert _bits(tf32_round(x)) == want
    assert _bits(operands.tf32_round(x)) == want
    # NaN stays NaN, of either sign, also one whose payload lies only in the 13 dropped bits
    nans = _from_bits([0x7FC00000, 0xFFC00000, 0x7FBFFFFF, 0xFF802000, 0x7F800001, 0xFF801001])
    assert torch.isnan(tf32_round(nans)).all() and torch.isnan(operands.tf32_round(nans)).all()
    # random bit patterns (every exponent, both signs, ties and subnormals mixed in)
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**32, (1 << 16,), generator=g, dtype=torch.int64)
    bits[::7] = (bits[::7] & ~0x1FFF) | 0x1000  # exact ties
    bits[1::7] &= 0x807FFFFF  # subnormals and zeros
    y = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    ref, got = tf32_round(y), operands.tf32_round(y)
    nan = torch.isnan(y)
    assert torch.equal(ref[~nan].view(torch.int32), got[~nan].view(torch.int32))
    assert torch.isnan(got[nan]).all() and torch.isnan(ref[nan]).all()


def rounded(t: torch.Tensor) -> torch.Tensor:
    """The operand values the tensor core multiplies, in float64."""
    return (tf32_round(t) if t.dtype == torch.float32 else t).double()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def sas_reference(x, w, b, M):
    out = project(rounded(x), M) @ rounded(w).T
    return out + b.double() if b is not None else out


def run_poisoned(plan: kp.Plan) -> torch.Tensor:
    """Run a plan in the emulator with NaN-poisoned output and operand buffers; assert that
    no shared-memory access of its kernels had a bank conflict."""
    plan.out.fill_(float("nan"))
    operand = plan.extras.get("operand")
    if operand is not None and len(plan.launches) == 2:  # SAS: the compress kernel writes it
        operand.vals.view(torch.uint8).fill_(0xFF)
        operand.meta.fill_(-1)
    launcher = emulator.launcher()
    for launch in plan.launches:
        launcher.launch(launch, 0)
        stats = emulator.smem_stats()
        extra = {kind: stats[kind]["extra"] for kind in emulator.SMEM_KINDS}
        assert not any(extra.values()), (launch.kernel, extra, stats["example"])
    return plan.out


# (R, K, N): odd K (element loads, ragged B rows), aligned K (16-byte cp.async), tiny,
# several tiles along N and R
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
    out32 = run_poisoned(kp.prepare_sas(x, w, bias, M, out_dtype=torch.float32, tile="64x64"))
    assert out32.dtype == torch.float32 and out32.shape == (R, N)
    assert rel_err(out32, sas_reference(x, w, bias, M)) < REL_TOL
    # the public entry point; its output is the fp32 accumulator rounded once to x's dtype
    out = emulator.sas_gemm(x, w, bias, M)
    assert out.dtype == dtype
    assert torch.equal(out, out32.to(dtype))


@pytest.mark.parametrize("dtype,M,shape,tile", [
    (torch.float16, 2, (130, 40, 140), "128x128"), (torch.bfloat16, 4, (129, 45, 131), "128x128"),
    (torch.float32, 2, (140, 33, 129), "128x128"), (torch.float16, 4, (200, 64, 70), "128x128"),
    (torch.bfloat16, 2, (133, 40, 270), "128x256"), (torch.float16, 4, (60, 45, 100), "128x256")])
def test_sas_gemm_large_tiles(dtype, M, shape, tile):
    R, K, N = shape
    g = torch.Generator().manual_seed(R + K + N)
    x = torch.randn(R, K, generator=g).to(dtype)
    w = torch.randn(N, M * K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    for out_dtype in (torch.float32, None):
        plan = kp.prepare_sas(x, w, bias, M, out_dtype=out_dtype, tile=tile, arch="sm_80")
        assert plan.gemm.kernel.startswith("spmma_") and tile in plan.gemm.kernel
        out = run_poisoned(plan)
        tol = REL_TOL if out.dtype == torch.float32 else 1e-2
        assert rel_err(out, sas_reference(x, w, bias, M)) < tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tile", ["128x128", "128x256"])
def test_wgmma_gemm_matches_reference(dtype, tile):
    """The sm_90a kernel (wgmma.mma_async.sp, operands through shared-memory descriptors)."""
    for M, (R, K, N) in [(2, (140, 40, 150)), (4, (70, 24, 260))]:
        g = torch.Generator().manual_seed(R + M)
        x = torch.randn(R, K, generator=g).to(dtype)
        w = torch.randn(N, M * K, generator=g).to(dtype)
        bias = torch.randn(N, generator=g).to(dtype)
        plan = kp.prepare_sas(x, w, bias, M, out_dtype=torch.float32, tile=tile, arch="sm_90")
        assert plan.gemm.kernel == f"spwgmma_{'f16' if dtype == torch.float16 else 'bf16'}_{tile}_sas"
        assert rel_err(run_poisoned(plan), sas_reference(x, w, bias, M)) < REL_TOL
    packing = pytest.importorskip("sas_compile.runtime.packing")
    g = torch.Generator().manual_seed(11)
    dense = two_of_four_weight(140, 72, g).to(dtype)
    x = torch.randn(75, 72, generator=g).to(dtype)
    plan = kp.prepare_sws(x, packing.pack_sws_weight(dense), None, out_dtype=torch.float32, tile=tile, arch="sm_90")
    assert plan.gemm.kernel.startswith("spwgmma_") and plan.gemm.kernel.endswith("_sws")
    assert rel_err(run_poisoned(plan), rounded(x) @ rounded(dense).T) < REL_TOL


@pytest.mark.parametrize("arch,tile,R", [("sm_80", "64x64", 600), ("sm_90", "128x128", 1100)])
def test_grouped_tile_order_covers_every_tile(arch, tile, R):
    """More than one group of 8 A tiles along the rows, a ragged last group, 2 B tiles."""
    g = torch.Generator().manual_seed(R)
    x = torch.randn(R, 8, generator=g).half()
    w = torch.randn(130, 16, generator=g).half()
    plan = kp.prepare_sas(x, w, None, 2, out_dtype=torch.float32, tile=tile, arch=arch)
    bm, bn = kp.TILES[tile]
    assert plan.gemm.grid == (-(-R // bm) * -(-130 // bn), 1) and -(-R // bm) > 8
    assert plan.gemm.kernel.startswith("spwgmma_" if arch == "sm_90" else "spmma_")
    assert rel_err(run_poisoned(plan), sas_reference(x, w, None, 2)) < REL_TOL


def test_sm90_routes_ragged_rows_and_float32_to_mma_sp():
    x, w = torch.randn(5, 45).half(), torch.randn(7, 90).half()  # 90 halves: rows not 16-byte aligned
    assert kp.prepare_sas(x, w, None, 2, arch="sm_90").gemm.kernel.startswith("spmma_")
    assert kp.prepare_sas(x[:, :40], w[:, :80], None, 2, arch="sm_90").gemm.kernel.startswith("spwgmma_")
    assert kp.prepare_sas(x.float(), w.float(), None, 2, arch="sm_90").gemm.kernel.startswith("spmma_f32")
    assert kp.prepare_sas(x, w, None, 2, arch="sm_90", tile="128x256").gemm.kernel == "spmma_f16_128x256_sas"
    assert kp.prepare_sas(x, w, None, 2, arch="sm_90", tile="64x64").gemm.kernel == "spmma_f16_64x64_sas"
    with pytest.raises(ValueError, match="float16/bfloat16"):
        kp.prepare_sas(x.float(), w.float(), None, 2, arch="sm_80", tile="128x256")


def test_sas_gemm_zeros_signs_and_infinities_follow_the_slot_rule():
    # exact zeros and a partner at +-0 decide the M = 4 slot (x <= 0 counts as nonpositive);
    # an infinite input gives +-inf outputs (|x| * w), never the NaN of a 0 * inf
    x = torch.tensor([[0.0, -1.5, 2.0, 0.0, -0.0, 3.0, 1.0]]).repeat(6, 1)
    x[1:4] = torch.randn(3, 7)
    x[4, 2] = float("inf")
    x[5, 5] = -float("inf")
    w = torch.randn(6, 4 * 7).abs() + 0.5  # positive: the inf rows stay +inf, no inf - inf
    for M in (2, 4):
        for dtype in DTYPES:
            xd, wd = x.to(dtype), w[:, : M * 7].to(dtype)
            out = run_poisoned(kp.prepare_sas(xd, wd, None, M, out_dtype=torch.float32, tile="64x64"))
            ref = reference_project(rounded(xd), M) @ rounded(wd).T
            assert torch.equal(torch.isinf(out[4:]), torch.isinf(ref[4:])) and not torch.isnan(out).any()
            assert torch.equal(out[4:], ref[4:].float())
            assert rel_err(out[:4], ref[:4]) < REL_TOL


# ---- the compress kernel on its own ---------------------------------------------------------
def special_values(R, K, dtype, generator):
    """Random values with +-0, NaN of both signs, +-inf and tiny magnitudes mixed in."""
    x = torch.randn(R, K, generator=generator).to(dtype)
    flat = x.view(-1)
    picks = torch.randperm(flat.numel(), generator=generator)[: min(flat.numel(), 24)]
    specials = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, -1e-30, 0.0]
    for i, p in enumerate(picks.tolist()):
        flat[p] = specials[i % len(specials)]
    neg_nan = torch.tensor([float("nan")], dtype=dtype)
    bits = neg_nan.view(torch.int16 if dtype != torch.float32 else torch.int32)
    bits |= -(2 ** (15 if dtype != torch.float32 else 31))  # sign bit set: NaN is not <= 0
    flat[picks[-1]] = neg_nan[0]
    return x


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = torch.int16 if a.element_size() == 2 else torch.int32
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("shape", [(37, 45), (20, 64), (1, 3)], ids=lambda s: "x".join(map(str, s)))
def test_compress_writes_the_documented_operand(dtype, M, shape):
    R, K = shape
    x = special_values(R, K, dtype, torch.Generator().manual_seed(R + K + M))
    launch, op = kp.prepare_compress(x, M)
    assert bool(launch.params.flags & kp.FLAG_X_VEC) == (K * x.element_size() % 16 == 0)
    op.vals.view(torch.uint8).fill_(0xA5)
    op.meta.fill_(0x5A5A5A5A)
    emulator.launcher().launch(launch, 0)
    want = operands.compress_reference(x, M)
    assert same_bits(op.vals, want.vals)
    assert torch.equal(op.meta, want.meta)
    # the layout read back means S(x): |x| in the slot of the index rule, zeros elsewhere
    dense = operands.operand_to_dense(op)
    ref = reference_project(rounded(x), M)
    assert dense.shape == ref.shape
    assert torch.equal(torch.isnan(dense), torch.isnan(ref))
    assert torch.equal(torch.where(torch.isnan(dense), 0.0, dense), torch.where(torch.isnan(ref), 0.0, ref))


def test_compress_reference_decodes_to_the_projection_for_zero_runs():
    """All-zero and all-negative rows exercise every index combination of the rule."""
    x = torch.tensor([[0.0] * 9, [-1.0] * 9, [1.0, -1.0] * 4 + [2.0], [-0.0, 0.0, -3.0, 0.0, 5.0, -0.0, 1.0, -1.0, 0.0]])
    for M in (2, 4):
        for dtype in DTYPES:
            op = operands.compress_reference(x.to(dtype), M)
            assert torch.equal(operands.operand_to_dense(op), reference_project(rounded(x.to(dtype)), M))


# ---- SWS ---------------------------------------------------------------------------------
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
    """Any 2:4 pattern, including both entries inside one pair (the tf32 split operand)."""
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
    out32 = run_poisoned(kp.prepare_sws(x, packed, bias, out_dtype=torch.float32, tile="64x64"))
    ref = rounded(x) @ rounded(dense).T
    if bias is not None:
        ref = ref + bias.double()
    assert rel_err(out32, ref) < REL_TOL
    assert torch.equal(emulator.sws_gemm(x, packed, bias), out32.to(dtype))
    op = packed._derived["kernel_operand"][1]  # built once, kept on the packed weight
    split = dtype == torch.float32 and pattern == "2:4"
    assert op.ktiles == (2 if split else 1) * op.b_ktiles


def test_sws_gemm_128x128_tile():
    g = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        dense = two_of_four_weight(130, 72, g).to(dtype)
        x = torch.randn(140, 72, generator=g).to(dtype)
        bias = torch.randn(130, generator=g).to(dtype)
        out = run_poisoned(kp.prepare_sws(x, packing.pack_sws_weight(dense), bias, out_dtype=torch.float32,
                                          tile="128x128", arch="sm_80"))
        assert rel_err(out, rounded(x) @ rounded(dense).T + bias.double()) < REL_TOL


def test_sws_operand_reads_back_as_the_weight():
    g = torch.Generator().manual_seed(3)
    for dtype in DTYPES:
        for dense in (two_of_four_weight(21, 37, g), one_of_m_weight(19, 64, 4, g)):
            dense = dense.to(dtype)
            op = operands.sws_operand(packing.pack_sws_weight(dense))
            assert torch.equal(operands.operand_to_dense(op), rounded(dense))


# ---- shared-memory bank conflicts ----------------------------------------------------------
def test_every_kernel_family_is_counted_and_conflict_free():
    """run_poisoned asserts zero extra wavefronts; here: the counter saw every access kind."""
    x, w = torch.randn(70, 64).half(), torch.randn(67, 128).half()
    seen = {}
    for arch, tile in (("sm_80", "64x64"), ("sm_80", "128x128"), ("sm_90", "128x128"), ("sm_90", "128x256")):
        for out_dtype in (None, torch.float32):
            plan = kp.prepare_sas(x, w, None, 2, out_dtype=out_dtype, tile=tile, arch=arch)
            run_poisoned(plan)
            stats = emulator.smem_stats()
            seen[(plan.gemm.kernel, out_dtype)] = {k: stats[k]["instructions"] for k in emulator.SMEM_KINDS}
    for (kernel, _), counts in seen.items():
        assert counts["cp.async"] > 0 and counts["ld.shared"] > 0 and counts["st.shared"] > 0, (kernel, counts)
        assert (counts["ldmatrix"] > 0) == kernel.startswith("spmma_"), (kernel, counts)


@pytest.mark.parametrize("stride,bytes_per_lane,ldmatrix,extra", [
    (4, 4, False, 0), (128, 4, False, 31), (8, 8, False, 0), (256, 8, False, 30), (16, 16, False, 0),
    (32, 16, False, 4), (16, 16, True, 0), (128, 16, True, 28)])
def test_bank_conflict_counter_counts_conflicts(stride, bytes_per_lane, ldmatrix, extra):
    stats = emulator.bank_probe(stride, bytes_per_lane, ldmatrix)
    kind = "ldmatrix" if ldmatrix else "ld.shared"
    assert stats[kind]["instructions"] == 1
    assert stats[kind]["extra"] == extra, stats


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


# ---- ... and of wgmma.mma_async.sp, from the PTX ISA's tables ------------------------------
# Written from PTX ISA 9.7.15.5.1.2 (canonical K-major layouts, swizzle modes, matrix
# descriptor format), 9.7.15.6.2.1 (sparse m64nNk32: each warp gives the metadata of its 16
# rows with the layout of mma.sp m16n8k32 (Figure 176), selector 0: lanes 4g, 4g+1) and the
# D layout of m64nNk16/32 (Figure 149): d[i] of lane l of warp w is row 16w + l/4 + 8((i/2)%2),
# column 8(i/4) + 2(l%4) + i%2.
SWIZZLE_WIDTH = {0: None, 1: 128, 2: 64, 3: 32}  # descriptor mode -> bytes per row of the atom


def kmajor_byte_address(row: int, col_bytes: int, mode: int, lbo: int, sbo: int) -> int:
    """Byte offset of element (row, col) of a K-major matrix: the canonical layouts
    ((8,m),(T,2k)):((1T,SBO),(1,LBO)) without swizzle, ((8,m),(T,2k)):((wT,SBO),(1,T))
    with Swizzle<b,4,3> (w 16-byte units per row) on the byte address."""
    if mode == 0:
        return (row % 8) * 16 + (row // 8) * sbo + (col_bytes % 16) + (col_bytes // 16) * lbo
    width = SWIZZLE_WIDTH[mode]
    addr = (row % 8) * width + (row // 8) * sbo + col_bytes
    bits = {128: 3, 64: 2, 32: 1}[width]
    return addr ^ (((addr >> 7) & ((1 << bits) - 1)) << 4)


def descriptor(start: int, lbo: int, sbo: int, mode: int) -> int:
    """Matrix descriptor: start, LBO, SBO (>> 4) in bits 0-13, 16-29, 32-45; mode in 62-63."""
    enc = lambda v: (v & 0x3FFFF) >> 4  # noqa: E731
    return enc(start) | (enc(lbo) << 16) | (enc(sbo) << 32) | (mode << 62)


def wgmma_case(n, a_mode, b_mode, dtype, a_compressed, positions, b):
    """Shared-memory image, descriptors and per-thread metadata for one m64n{n}k32 case.
    ``a_compressed`` [64, 16], ``positions`` [64, 8, 2] (i0 < i1), ``b`` [32, n] (k, n)."""
    elem = 2
    a_lbo, a_sbo = (128, 256) if a_mode == 0 else (16, 8 * SWIZZLE_WIDTH[a_mode])
    b_lbo, b_sbo = (128, 256) if b_mode == 0 else (16, 8 * SWIZZLE_WIDTH[b_mode])
    a_start, b_start = 0, 16384
    image = torch.zeros(b_start + n * 128 + 4096, dtype=torch.uint8)
    a_bits = a_compressed.to(dtype).view(torch.int16)
    b_bits = b.to(dtype).view(torch.int16)
    for r in range(64):
        for c in range(16):
            addr = a_start + kmajor_byte_address(r, c * elem, a_mode, a_lbo, a_sbo)
            image[addr:addr + 2] = a_bits[r, c:c + 1].view(torch.uint8)
    for col in range(n):  # B is K-major: row = n, column = k
        for k in range(32):
            addr = b_start + kmajor_byte_address(col, k * elem, b_mode, b_lbo, b_sbo)
            image[addr:addr + 2] = b_bits[k, col:col + 1].view(torch.uint8)
    meta = torch.zeros(128, dtype=torch.int64)
    for w in range(4):
        for g in range(8):
            for t in range(2):  # selector 0: threads 4g (chunks 0-3) and 4g+1 (chunks 4-7)
                word = 0
                for half, row in ((0, 16 * w + g), (1, 16 * w + g + 8)):
                    for j in range(4):
                        i0, i1 = positions[row, 4 * t + j].tolist()
                        word |= (i0 | (i1 << 2)) << (16 * half + 4 * j)
                meta[32 * w + 4 * g + t] = word
    meta = torch.where(meta >= 2**31, meta - 2**32, meta).to(torch.int32)
    return image, descriptor(a_start, a_lbo, a_sbo, a_mode), descriptor(b_start, b_lbo, b_sbo, b_mode), meta


def d_to_matrix(d: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.empty(64, n, dtype=d.dtype)
    for tid in range(128):
        w, lane = divmod(tid, 32)
        for i in range(n // 2):
            out[16 * w + lane // 4 + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * (lane % 4) + (i & 1)] = d[tid, i]
    return out


def decompress(a_compressed, positions):
    dense = torch.zeros(64, 32, dtype=torch.float64)
    for j in range(8):
        for e in range(2):
            dense[torch.arange(64), 4 * j + positions[:, j, e]] += a_compressed[:, 2 * j + e].double()
    return dense


def test_wgmma_sp_known_answer_extends_llvm_case():
    # LLVM's values (A[i][j] = i + j + 1 at positions 0 and 2, B[k][n] = n - k) over 64 rows
    # and 128 columns, in the kernels' layouts (A: 64-byte swizzle, B: 128-byte swizzle)
    i = torch.arange(64)
    a = (i[:, None] + torch.arange(16)[None, :] + 1).double()
    positions = torch.tensor([0, 2]).repeat(64, 8, 1)
    n = 128
    b = (torch.arange(n)[None, :] - torch.arange(32)[:, None]).double()
    image, da, db, meta = wgmma_case(n, 2, 1, torch.float16, a, positions, b)
    d = emulator.wgmma_sp_probe(image, da, db, meta, torch.zeros(128, n // 2))
    c = d_to_matrix(d, n)
    assert torch.equal(c[0, :8], torch.tensor([-2720, -2584, -2448, -2312, -2176, -2040, -1904, -1768.0]))
    assert torch.equal(c[8, :8], torch.tensor([-4640, -4376, -4112, -3848, -3584, -3320, -3056, -2792.0]))
    assert torch.equal(c[15, :8], torch.tensor([-6320, -5944, -5568, -5192, -4816, -4440, -4064, -3688.0]))
    cc = torch.arange(16.0)
    full = ((i[:, None, None] + cc + 1) * (torch.arange(n)[None, :, None] - 2 * cc)).sum(-1)
    assert torch.equal(c, full.float())


@pytest.mark.parametrize("n,a_mode,b_mode,dtype", [
    (128, 2, 1, torch.float16), (128, 0, 2, torch.float16), (128, 3, 1, torch.bfloat16), (256, 2, 1, torch.bfloat16)])
def test_wgmma_sp_random_patterns_every_swizzle_mode(n, a_mode, b_mode, dtype):
    g = torch.Generator().manual_seed(n + a_mode * 10 + b_mode)
    a = torch.randint(-8, 9, (64, 16), generator=g).double()
    pairs = torch.tensor([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])
    positions = pairs[torch.randint(0, 6, (64, 8), generator=g)]
    b = torch.randint(-8, 9, (32, n), generator=g).double()
    c_in = torch.randint(-4, 5, (128, n // 2), generator=g).float()
    image, da, db, meta = wgmma_case(n, a_mode, b_mode, dtype, a, positions, b)
    d = emulator.wgmma_sp_probe(image, da, db, meta, c_in, bf16=dtype == torch.bfloat16)
    expected = decompress(a, positions) @ b + d_to_matrix(c_in, n).double()
    assert torch.equal(d_to_matrix(d, n).double(), expected)


def test_wgmma_sp_mistakes_are_reported():
    a = torch.ones(64, 16, dtype=torch.float64)
    positions = torch.tensor([0, 1]).repeat(64, 8, 1)
    b = torch.ones(32, 128, dtype=torch.float64)
    image, da, db, meta = wgmma_case(128, 2, 1, torch.float16, a, positions, b)
    d = torch.zeros(128, 64)
    for omit, message in [("proxy_fence", "fence.proxy.async"), ("wgmma_fence", "without a wgmma.fence"),
                          ("wait", "never waited for")]:
        with pytest.raises(emulator.EmulatorError, match=message):
            emulator.wgmma_sp_probe(image, da, db, meta, d, omit=(omit,))
    bad = meta.clone()
    bad[0] = 0  # indices (0, 0) for the chunks of thread 0
    with pytest.raises(emulator.EmulatorError, match="invalid metadata"):
        emulator.wgmma_sp_probe(image, da, db, bad, d)


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


def test_batched_leading_dims_through_sas_matmul():
    matmul = pytest.importorskip("sas_compile.runtime.matmul")
    x = torch.randn(2, 3, 5, 20, dtype=torch.float16)
    w = torch.randn(11, 2 * 20, dtype=torch.float16)
    b = torch.randn(11, dtype=torch.float16)
    out = matmul.sas_matmul(x, w, b, M=2, target="emulator")
    assert out.shape == (2, 3, 5, 11) and out.dtype == torch.float16
    ref = sas_reference(x.reshape(-1, 20), w, b, 2).reshape(2, 3, 5, 11)
    assert rel_err(out, ref) < 2e-3  # one float16 rounding of the output
