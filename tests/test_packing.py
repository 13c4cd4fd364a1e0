"""Packed 2:4 formats: the runtime's SWS weight format and the CUTLASS pack of an SAS activation."""
import pytest
import torch
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass,
    sparse_semi_structured_to_dense_cutlass,
)

from sas_compile.runtime.matmul import sas_matmul
from sas_compile.runtime.packing import (
    PackedSparseWeight,
    cutlass_reorder_meta,
    pack_sas_activation_cutlass,
    pack_sws_weight,
    packed_to_cutlass,
    unpack_sws_weight,
)
from sas_compile.runtime.projection import project

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def nonzero_randn(*shape, generator, dtype=torch.float32):
    """Random values bounded away from zero (a zero would make the 2:4 pattern degenerate)."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return (x + x.sign() * 0.05).to(dtype)


def one_in_m_mask(n, k, M, generator):
    """Random 1:M mask: one kept weight per M consecutive weights of a row (K % M == 0)."""
    chunks = torch.zeros(n, k // M, M)
    keep = torch.randint(0, M, (n, k // M), generator=generator)
    chunks.scatter_(-1, keep.unsqueeze(-1), 1.0)
    return chunks.reshape(n, k) != 0


def random_24_mask(n, k, generator):
    """Random mask with 0, 1 or 2 kept entries in every aligned group of 4 (last group partial)."""
    mask = torch.zeros(n, k, dtype=torch.bool)
    for row in range(n):
        for start in range(0, k, 4):
            width = min(4, k - start)
            count = int(torch.randint(0, min(2, width) + 1, (1,), generator=generator))
            picks = torch.randperm(width, generator=generator)[:count]
            mask[row, start + picks] = True
    return mask


def decode_by_hand(packed):
    """Slow reading of the documented format, bit by bit, as a kernel would read it."""
    n, k = packed.shape
    kp = -(-k // 16) * 16
    assert packed.values.shape == (n, kp // 2)
    assert packed.meta.shape == (n, kp // 16) and packed.meta.dtype == torch.int16
    dense = torch.zeros(n, kp, dtype=torch.float64)
    for row in range(n):
        for group in range(kp // 4):
            word = int(packed.meta[row, group // 4]) & 0xFFFF
            nibble = (word >> (4 * (group % 4))) & 0xF
            i0, i1 = nibble & 3, nibble >> 2
            assert i0 < i1, f"row {row} group {group}: indices {i0}, {i1} not increasing"
            dense[row, 4 * group + i0] = float(packed.values[row, 2 * group])
            dense[row, 4 * group + i1] = float(packed.values[row, 2 * group + 1])
    assert not dense[:, k:].any(), "padding columns must stay zero"
    return dense[:, :k]


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_one_in_m_weight_round_trip_is_exact(M, dtype):
    g = torch.Generator().manual_seed(10 + M)
    n, k = 7, 40  # K not a multiple of 16: padded to 48
    weight = nonzero_randn(n, k, generator=g, dtype=dtype) * one_in_m_mask(n, k, M, g)
    packed = pack_sws_weight(weight, M)
    assert packed.shape == (n, k) and packed.M == M and packed.values.dtype == dtype
    assert packed.values.shape == (n, 24) and packed.meta.shape == (n, 3)
    assert torch.equal(unpack_sws_weight(packed), weight)
    assert torch.equal(decode_by_hand(packed), weight.to(torch.float64))


@pytest.mark.parametrize("k", [1, 3, 13, 16, 37])
def test_ragged_24_weight_round_trip_and_documented_layout(k):
    g = torch.Generator().manual_seed(k)
    n = 5
    weight = nonzero_randn(n, k, generator=g) * random_24_mask(n, k, g)
    packed = pack_sws_weight(weight)
    assert packed.M is None
    assert torch.equal(unpack_sws_weight(packed), weight)
    assert torch.equal(decode_by_hand(packed), weight.to(torch.float64))


def test_packed_weight_values_are_the_kept_nonzeros_in_column_order():
    # row 0: group 0 keeps columns 1 and 3; group 1 keeps column 6 (plus an explicit zero)
    weight = torch.zeros(1, 8)
    weight[0, 1], weight[0, 3], weight[0, 6] = 1.5, -2.0, 3.0
    packed = pack_sws_weight(weight)
    assert packed.values[0, :2].tolist() == [1.5, -2.0]
    assert 3.0 in packed.values[0, 2:4].tolist() and 0.0 in packed.values[0, 2:4].tolist()
    word = int(packed.meta[0, 0]) & 0xFFFF
    assert word & 0xF == 1 | (3 << 2)


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_weight_equals_torch_cutlass_pack(M, dtype):
    g = torch.Generator().manual_seed(3 * M)
    n, k = 64, 96
    weight = nonzero_randn(n, k, generator=g, dtype=dtype) * one_in_m_mask(n, k, M, g)
    values, meta = packed_to_cutlass(pack_sws_weight(weight, M))
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(weight)
    assert torch.equal(values, ref_values)
    assert torch.equal(meta, ref_meta)


def test_packed_weight_with_empty_and_single_groups_equals_torch_cutlass_pack():
    g = torch.Generator().manual_seed(5)
    weight = nonzero_randn(32, 64, generator=g, dtype=torch.float16) * random_24_mask(32, 64, g)
    values, meta = packed_to_cutlass(pack_sws_weight(weight))
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(weight)
    assert torch.equal(values, ref_values) and torch.equal(meta, ref_meta)


def test_cutlass_reorder_is_a_permutation_that_torch_inverts():
    g = torch.Generator().manual_seed(1)
    weight = nonzero_randn(64, 64, generator=g, dtype=torch.float16) * random_24_mask(64, 64, g)
    packed = pack_sws_weight(weight)
    reordered = cutlass_reorder_meta(packed.meta)
    assert sorted(reordered.flatten().tolist()) == sorted(packed.meta.flatten().tolist())
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed.values, reordered), weight)


def test_weight_that_is_not_24_compatible_is_rejected_with_its_location():
    weight = torch.zeros(3, 8)
    weight[2, 4:7] = 1.0  # three nonzeros in row 2, columns 4..7
    with pytest.raises(ValueError, match=r"row 2, columns 4\.\.7 hold 3 nonzeros.*not 2:4"):
        pack_sws_weight(weight)


def test_one_in_two_chunks_straddling_rows_are_rejected():
    # flattened 1:2 chunks over a [2, 5] weight: K is odd, so row 1 starts mid-chunk and its
    # first group of 4 (flat 5..8) meets three chunks, each with its kept weight inside
    weight = torch.zeros(2, 5)
    flat = weight.view(-1)
    flat[[1, 2, 5, 6, 8]] = 1.0  # one kept weight in each chunk (0,1) (2,3) (4,5) (6,7) (8,9)
    with pytest.raises(ValueError, match=r"row 1, columns 0\.\.3 hold 3 nonzeros.*\(here K = 5, M = 2\)"):
        pack_sws_weight(weight, M=2)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.ones(4), "2-D"),
        (torch.ones(2, 4, dtype=torch.int32), "floating point"),
        (torch.ones(3, 0), "K = 0"),
    ],
)
def test_bad_weight_inputs_name_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        pack_sws_weight(bad)


def test_bad_M_is_rejected():
    with pytest.raises(ValueError, match="M=3"):
        pack_sws_weight(torch.zeros(2, 8), M=3)


def test_packed_to_cutlass_rejects_shapes_cutlass_cannot_tile():
    with pytest.raises(ValueError, match="N % 32 == 0 and K % 32 == 0"):
        packed_to_cutlass(pack_sws_weight(torch.zeros(8, 40, dtype=torch.float16)))


@pytest.mark.parametrize("M", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, k", [(32, 16), (64, 48), (96, 80)])
def test_sas_activation_pack_equals_torch_cutlass_of_wide_activation(M, dtype, rows, k):
    g = torch.Generator().manual_seed(rows + k + M)
    x = nonzero_randn(rows, k, generator=g, dtype=dtype)
    values, meta = pack_sas_activation_cutlass(x, M)
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(project(x, M))
    assert values.dtype == ref_values.dtype and meta.dtype == ref_meta.dtype
    assert torch.equal(values, ref_values)
    assert torch.equal(meta, ref_meta)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sas_activation_values_are_the_narrow_magnitudes_for_m2(dtype):
    g = torch.Generator().manual_seed(2)
    x = nonzero_randn(32, 32, generator=g, dtype=dtype)
    values, _ = pack_sas_activation_cutlass(x, 2)
    assert torch.equal(values, x.abs())


@pytest.mark.parametrize("M", [2, 4])
def test_sas_activation_pack_with_exact_zeros_still_matches_torch(M):
    g = torch.Generator().manual_seed(9)
    x = nonzero_randn(64, 32, generator=g, dtype=torch.float16).t()  # not contiguous
    x[torch.rand(32, 64, generator=g) < 0.3] = 0.0
    values, meta = pack_sas_activation_cutlass(x, M)
    ref_values, ref_meta = sparse_semi_structured_from_dense_cutlass(project(x, M))
    assert torch.equal(values, ref_values) and torch.equal(meta, ref_meta)


@pytest.mark.parametrize(
    "x, M, match",
    [
        (torch.randn(30, 16, dtype=torch.float16), 2, "30 rows"),
        (torch.randn(32, 8, dtype=torch.float16), 2, "M\\*K = 2\\*8 = 16 must be a positive multiple of 32"),
        (torch.randn(32, 4, dtype=torch.float32), 2, "multiple of 16"),
        (torch.randn(32, 16, dtype=torch.float64), 2, "float64"),
        (torch.randn(32, 16, dtype=torch.float16), 3, "M=3"),
        (torch.randn(2, 32, 16, dtype=torch.float16), 2, "2-D"),
    ],
)
def test_sas_activation_pack_rejects_what_cutlass_cannot_take(x, M, match):
    with pytest.raises(ValueError, match=match):
        pack_sas_activation_cutlass(x, M)


# ---------------------------------------------------------------- GPU (skipped without CUDA)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_weight_matches_torch_cutlass_layout(M, dtype):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    from vendor_sparse import skip_unless_cutlass_24

    skip_unless_cutlass_24()
    g = torch.Generator().manual_seed(M)
    n, k = 128, 256
    weight = (nonzero_randn(n, k, generator=g, dtype=dtype) * one_in_m_mask(n, k, M, g)).cuda()
    packed = pack_sws_weight(weight, M)
    values, meta = packed_to_cutlass(packed)
    saved = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = True
    try:
        sparse = to_sparse_semi_structured(weight)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = saved
    assert torch.equal(sparse.packed, values)
    assert torch.equal(sparse.meta, meta)
    assert torch.equal(sparse.to_dense(), unpack_sws_weight(packed))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_weight_product_matches_the_default_vendor_backend(M, dtype):
    """cuSPARSELt on sm_90 (CUTLASS on 8.x without cuSPARSELt) multiplies the same 1:M weight."""
    from torch.sparse import to_sparse_semi_structured

    g = torch.Generator().manual_seed(M)
    n, k = 128, 256
    weight = (nonzero_randn(n, k, generator=g, dtype=dtype) * one_in_m_mask(n, k, M, g)).cuda()
    packed = pack_sws_weight(weight, M)
    b = torch.randn(k, 64, generator=g).to(dtype).cuda()
    product = torch.mm(to_sparse_semi_structured(weight), b).double()
    reference = unpack_sws_weight(packed).double() @ b.double()
    assert (product - reference).abs().max() <= 2e-2 * reference.abs().max()


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cutlass_mm_on_the_sas_pack_equals_sas_matmul_cpu(M, dtype):
    from vendor_sparse import skip_unless_cutlass_24

    skip_unless_cutlass_24()
    g = torch.Generator().manual_seed(20 + M)
    rows, k, n = 128, 96, 80
    x = nonzero_randn(rows, k, generator=g, dtype=dtype).cuda()
    weight = torch.randn(n, M * k, generator=g).to(dtype).cuda()
    values, meta = pack_sas_activation_cutlass(x, M)
    fused_free = torch._sparse_semi_structured_mm(values, meta, weight.t().contiguous())
    reference = sas_matmul(x.double(), weight.double(), M=M, target="torch")
    err = (fused_free.double() - reference).abs().max()
    assert err <= 1e-2 * reference.abs().max(), f"CUTLASS path off by {err}"


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vendor_24_on_the_projected_activation_equals_sas_matmul_cpu(M, dtype):
    from vendor_sparse import vendor_sas_product

    g = torch.Generator().manual_seed(40 + M)
    rows, k, n = 128, 96, 80
    x = nonzero_randn(rows, k, generator=g, dtype=dtype).cuda()
    weight = torch.randn(n, M * k, generator=g).to(dtype).cuda()
    reference = sas_matmul(x.double(), weight.double(), M=M, target="torch")
    err = (vendor_sas_product(x, weight, M).double() - reference).abs().max()
    assert err <= 1e-2 * reference.abs().max(), f"vendor 2:4 path off by {err}"


def test_round_trip_holds_for_any_24_compatible_weight():
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=40, deadline=None)
    @given(n=st.integers(1, 6), k=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
    def check(n, k, seed):
        g = torch.Generator().manual_seed(seed)
        weight = nonzero_randn(n, k, generator=g, dtype=torch.bfloat16) * random_24_mask(n, k, g)
        packed = pack_sws_weight(weight)
        assert torch.equal(unpack_sws_weight(packed), weight)
        assert torch.equal(decode_by_hand(packed), weight.to(torch.float64))

    check()
