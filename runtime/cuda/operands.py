"""The compressed sparse operand the GEMM kernels read ("SpA"), in PyTorch only.

Why this module exists: the kernels (``spmma.cu``, ``spwgmma.cu``) multiply a dense operand
by a pre-compressed 2:4 (16-bit) or 1:2 (tf32) operand laid out in the order the MMA
fragments load it (``sparse_common.cuh`` documents the layout). Two producers make it: the
``sas_compress`` kernel from a narrow activation (SAS), and :func:`sws_operand` here from a
:class:`~sas_compile.runtime.packing.PackedSparseWeight` (SWS, once per weight, cached on
it). :func:`compress_reference` is the PyTorch statement of what ``sas_compress`` must
write, bit for bit, and :func:`operand_to_dense` reads any operand back into the dense
matrix it stands for; both exist for tests and debugging. No CUDA library is imported.

Layout, per k-tile of 128 bytes of the dense operand's rows (64 wide columns for 16-bit
types, 32 for float32):

* ``vals`` ``[rows_pad, a_ld]``: 64 bytes of kept values per row and k-tile;
* ``meta`` int32 ``[rows_pad // 16, ktiles, 32]``: word ``g*4 + t*2 + step`` of a 16-row
  block is the mma.sp metadata register of lane ``4g + t`` for k-step ``step``: rows ``g``
  (bits 0-15) and ``g + 8`` (bits 16-31), chunks ``4t .. 4t+3`` at 4 bits each. A chunk is
  a group of 4 wide columns holding 2 values (16-bit: ``i0 | i1 << 2``, ``i0 < i1``) or a pair
  holding 1 value (tf32: ``0x4`` = first, ``0xE`` = second).

``rows_pad`` is a multiple of :data:`ROW_PAD`; padding rows and columns hold zeros with
valid indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ROW_PAD",
    "KTILE_BYTES_B",
    "KTILE_BYTES_A",
    "SparseOperand",
    "layout",
    "compress_reference",
    "sws_operand",
    "pack_dense_operand",
    "operand_to_dense",
    "tf32_round",
]

ROW_PAD = 128       # rows of an operand are padded to a multiple of this (kRowPad)
KTILE_BYTES_B = 128  # bytes of a dense-operand row per k-tile
KTILE_BYTES_A = 64   # bytes of a compressed row per k-tile

_SIZES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
_NIBBLE_TF32 = (0x4, 0xE)


@dataclass
class SparseOperand:
    """A compressed operand: the tensors and the sizes a kernel launch needs.

    ``rows``: valid rows; ``k``: valid wide columns of one part; ``ktiles``: k-tiles of the
    operand; ``b_ktiles``: k-tiles of the dense operand (``ktiles`` is a multiple: a float32
    2:4 weight with two entries in one pair is split in two 1:2 parts over the same K).
    """

    vals: Tensor
    meta: Tensor
    rows: int
    k: int
    ktiles: int
    b_ktiles: int

    @property
    def rows_pad(self) -> int:
        return self.vals.shape[0]

    @property
    def a_ld(self) -> int:
        return self.vals.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.vals.dtype


def _check_dtype(dtype: torch.dtype) -> int:
    if dtype not in _SIZES:
        raise TypeError(f"sparse operands take float16, bfloat16 or float32 values, not {dtype}")
    return _SIZES[dtype]


def layout(rows: int, wide: int, dtype: torch.dtype):
    """``(rows_pad, ktiles, a_ld, wide_per_ktile)`` of an operand of ``rows`` x ``wide``."""
    size = _check_dtype(dtype)
    per_tile = KTILE_BYTES_B // size
    ktiles = max(1, -(-wide // per_tile))
    rows_pad = max(ROW_PAD, -(-rows // ROW_PAD) * ROW_PAD)
    return rows_pad, ktiles, ktiles * KTILE_BYTES_A // size, per_tile


def tf32_round(t: Tensor) -> Tensor:
    """``cvt.rna.tf32.f32``: keep 10 mantissa bits, round to nearest, ties away from zero;
    inf and NaN keep their class (a NaN whose payload sits only in the dropped bits gets the
    quiet bit, or truncation would make it inf)."""
    bits = t.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    special = (bits & 0x7F800000) == 0x7F800000
    nan = special & ((bits & 0x007FFFFF) != 0)
    rounded = torch.where(special, bits, bits + 0x1000) & 0xFFFFE000
    rounded = torch.where(nan, rounded | 0x00400000, rounded)
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded)
    return rounded.to(torch.int32).view(torch.float32)


def _words_to_fragment_order(words: Tensor, ktiles: int) -> Tensor:
    """``[rows_pad, 2 * ktiles]`` 32-bit row words (chunk j at bits 4j, one per k-step) ->
    the fragment-ordered metadata ``[rows_pad // 16, ktiles, 32]`` int32."""
    rows_pad = words.shape[0]
    w = words.to(torch.int64).reshape(rows_pad // 16, 2, 8, ktiles, 2)  # block, half, g, kt, step
    t_half = torch.stack((w & 0xFFFF, (w >> 16) & 0xFFFF), dim=-1)      # ..., t
    low, high = t_half[:, 0], t_half[:, 1]                              # rows g and g + 8
    combined = low | (high << 16)                                       # block, g, kt, step, t
    combined = combined.permute(0, 2, 1, 4, 3).reshape(rows_pad // 16, ktiles, 32)
    combined = torch.where(combined >= 2**31, combined - 2**32, combined)
    return combined.to(torch.int32).contiguous()


def _fragment_order_to_words(meta: Tensor) -> Tensor:
    """Inverse of :func:`_words_to_fragment_order`: -> ``[rows_pad, 2 * ktiles]`` int64."""
    blocks, ktiles, _ = meta.shape
    m = (meta.to(torch.int64) & 0xFFFFFFFF).reshape(blocks, ktiles, 8, 2, 2)  # block, kt, g, t, step
    low, high = m & 0xFFFF, (m >> 16) & 0xFFFF
    halves = torch.stack((low, high), dim=1)                                  # block, half, kt, g, t, step
    words = halves[..., 0, :] | (halves[..., 1, :] << 16)                     # block, half, kt, g, step
    return words.permute(0, 1, 3, 2, 4).reshape(blocks * 16, ktiles * 2)


def _pack_16bit(dense: Tensor, rows_pad: int, ktiles: int, a_ld: int):
    """Kept values and row words of a 2:4-compatible ``dense`` (16-bit, zero padded)."""
    from ..packing import code_table  # the kept positions PyTorch's CUTLASS tooling picks

    rows, wide = dense.shape
    per_tile = KTILE_BYTES_B // 2
    padded = dense.new_zeros((rows_pad, ktiles * per_tile))
    padded[:rows, :wide] = dense
    groups = padded.reshape(rows_pad, -1, 4)
    mask = ((groups != 0).to(torch.int64) << torch.arange(4, device=dense.device)).sum(-1)
    codes = code_table(dense.device)[mask]
    if bool((codes < 0).any()):
        raise ValueError("the operand is not 2:4-compatible (more than 2 nonzeros in a group of 4)")
    positions = torch.stack((codes & 3, codes >> 2), dim=-1)
    vals = groups.gather(-1, positions).reshape(rows_pad, a_ld)
    words = (codes.reshape(rows_pad, -1, 8) << (4 * torch.arange(8, device=dense.device))).sum(-1)
    return vals.contiguous(), words


def _pack_tf32(dense: Tensor, rows_pad: int, ktiles: int, a_ld: int):
    """Kept values (tf32-rounded) and row words of a 1:2-compatible float32 ``dense``."""
    rows, wide = dense.shape
    per_tile = KTILE_BYTES_B // 4
    padded = dense.new_zeros((rows_pad, ktiles * per_tile))
    padded[:rows, :wide] = dense
    pairs = padded.reshape(rows_pad, -1, 2)
    nonzero = pairs != 0
    if bool((nonzero.sum(-1) > 1).any()):
        raise ValueError("the operand is not 1:2-compatible (two nonzeros in a pair)")
    second = nonzero[..., 1]
    vals = tf32_round(torch.where(second, pairs[..., 1], pairs[..., 0])).reshape(rows_pad, a_ld)
    nibbles = torch.where(second, _NIBBLE_TF32[1], _NIBBLE_TF32[0]).to(torch.int64)
    words = (nibbles.reshape(rows_pad, -1, 8) << (4 * torch.arange(8, device=dense.device))).sum(-1)
    return vals.contiguous(), words


def pack_dense_operand(dense: Tensor) -> SparseOperand:
    """The operand of a dense matrix that is 2:4 (16-bit) or 1:2 (float32) compatible.

    A float32 matrix with two nonzeros in some pair (any 2:4 weight) is split into two 1:2
    parts along K: the first nonzero of every pair, then the second; the kernel adds both
    products (``b_ktiles = ktiles / 2``).
    """
    if dense.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(dense.shape)}")
    size = _check_dtype(dense.dtype)
    rows, wide = dense.shape
    rows_pad, ktiles, a_ld, _ = layout(rows, wide, dense.dtype)
    if size == 2:
        vals, words = _pack_16bit(dense, rows_pad, ktiles, a_ld)
        return SparseOperand(vals, _words_to_fragment_order(words, ktiles), rows, wide, ktiles, ktiles)
    nonzero = (dense != 0).reshape(rows, -1, 2) if wide % 2 == 0 else None
    if nonzero is None:
        nonzero = torch.nn.functional.pad(dense, (0, 1)).ne(0).reshape(rows, -1, 2)
    both = nonzero.all(-1)
    if not bool(both.any()):
        vals, words = _pack_tf32(dense, rows_pad, ktiles, a_ld)
        return SparseOperand(vals, _words_to_fragment_order(words, ktiles), rows, wide, ktiles, ktiles)
    # split: part 1 keeps the first nonzero of every pair, part 2 the second of full pairs
    padded = torch.nn.functional.pad(dense, (0, wide % 2)).reshape(rows, -1, 2)
    second_only = torch.zeros_like(padded)
    second_only[..., 1] = torch.where(both, padded[..., 1], torch.zeros_like(padded[..., 1]))
    first = (padded - second_only).reshape(rows, -1)[:, :wide]
    second = second_only.reshape(rows, -1)[:, :wide]
    v1, w1 = _pack_tf32(first, rows_pad, ktiles, a_ld)
    v2, w2 = _pack_tf32(second, rows_pad, ktiles, a_ld)
    vals = torch.cat((v1, v2), dim=1).contiguous()
    words = torch.cat((w1, w2), dim=1)
    return SparseOperand(vals, _words_to_fragment_order(words, 2 * ktiles), rows, wide, 2 * ktiles, ktiles)


def sws_operand(packed) -> SparseOperand:
    """The kernel operand of a ``PackedSparseWeight``, built once and kept on the object
    until its values or metadata change."""
    from ..packing import unpack_sws_weight

    version = (packed.values._version, packed.meta._version, packed.values.data_ptr(), packed.meta.data_ptr())
    cache = packed.__dict__.setdefault("_derived", {})
    hit = cache.get("kernel_operand")
    if hit is None or hit[0] != version:
        with torch.no_grad():
            hit = cache["kernel_operand"] = (version, pack_dense_operand(unpack_sws_weight(packed).contiguous()))
    return hit[1]


def _nonpositive(x: Tensor) -> Tensor:
    return x <= 0  # IEEE: +0 and -0 are, NaN is not


def compress_reference(x: Tensor, M: int) -> SparseOperand:
    """What ``sas_compress`` writes for ``x`` [R, K] and M in (2, 4), bit for bit.

    Slot rule (runtime/projection.py, sign_pattern): channel c's value is ``|x_c|`` in slot
    I; M = 2: I = [x_c <= 0]; M = 4: I = [x_2j <= 0] + 2 [x_2j+1 <= 0] for both channels of a
    pair, a last partial pair with its own bit only. Placement (sas_compress.cu): 16-bit
    M = 2: group (2q, 2q+1) -> values (|x_2q|, |x_2q+1|), indices ([x_2q<=0], 2+[x_2q+1<=0]);
    16-bit M = 4: group = channel -> (|x|, 0) at (I, 3), or (0, |x|) at (2, 3) when I = 3;
    tf32 M = 2: pair = channel, |x| at index I; tf32 M = 4: pairs (slots 0-1, 2-3), |x| at
    index I % 2 of pair I // 2, 0 at index 0 of the other.
    """
    if M not in (2, 4):
        raise ValueError(f"M={M}: the compressed layout covers M = 2 and 4")
    size = _check_dtype(x.dtype)
    R, K = x.shape
    rows_pad, ktiles, a_ld, per_tile = layout(R, M * K, x.dtype)
    channels = ktiles * per_tile // M
    xp = x.new_zeros((rows_pad, channels))
    xp[:R, :K] = x
    valid = torch.zeros((rows_pad, channels), dtype=torch.bool, device=x.device)
    valid[:R, :K] = True
    nonpos = _nonpositive(xp) & valid  # padding is "positive" zero
    mag_bits = xp.view(torch.int16 if size == 2 else torch.int32).to(torch.int64) & (0x7FFF if size == 2 else 0x7FFFFFFF)
    if M == 2:
        slot = nonpos.to(torch.int64)
    else:
        pairs = torch.nn.functional.pad(nonpos, (0, channels % 2)).reshape(rows_pad, -1, 2).to(torch.int64)
        slot = (pairs[..., 0] | (pairs[..., 1] << 1)).repeat_interleave(2, dim=1)[:, :channels]
    zero = torch.zeros_like(mag_bits)
    if size == 2:
        if M == 2:
            vals_bits = mag_bits  # channel order
            s = slot.reshape(rows_pad, -1, 2)
            codes = s[..., 0] | ((2 + s[..., 1]) << 2)
        else:
            first = torch.where(slot == 3, zero, mag_bits)
            second = torch.where(slot == 3, mag_bits, zero)
            vals_bits = torch.stack((first, second), dim=-1).reshape(rows_pad, -1)
            codes = torch.where(slot == 3, 0xE, slot | 0xC)
        vals_bits = torch.where(vals_bits >= 2**15, vals_bits - 2**16, vals_bits)
        vals = vals_bits.to(torch.int16).view(x.dtype).reshape(rows_pad, a_ld)
    else:
        mags = tf32_round(mag_bits.to(torch.int32).view(torch.float32)).view(torch.int32).to(torch.int64)
        if M == 2:
            vals_bits = mags
            codes = torch.where(slot == 1, 0xE, 0x4)
        else:
            hi, lo = slot >> 1, slot & 1
            nib = torch.where(lo == 1, 0xE, 0x4)
            vals_bits = torch.stack((torch.where(hi == 0, mags, zero), torch.where(hi == 1, mags, zero)), -1)
            codes = torch.stack((torch.where(hi == 0, nib, 0x4), torch.where(hi == 1, nib, 0x4)), -1)
            vals_bits, codes = vals_bits.reshape(rows_pad, -1), codes.reshape(rows_pad, -1)
        vals = vals_bits.to(torch.int32).view(torch.float32).reshape(rows_pad, a_ld)
    words = (codes.to(torch.int64).reshape(rows_pad, -1, 8) << (4 * torch.arange(8, device=x.device))).sum(-1)
    return SparseOperand(vals.contiguous(), _words_to_fragment_order(words, ktiles), R, M * K, ktiles, ktiles)


def operand_to_dense(op: SparseOperand, parts_summed: bool = True) -> Tensor:
    """The dense float64 ``[rows, k]`` matrix an operand stands for, read from its layout.

    Raises ValueError on an invalid index (16-bit: i0 >= i1; tf32: a nibble other than 0x4,
    0xE). With split float32 parts, the parts are summed (``parts_summed``) as the kernel does.
    """
    size = _check_dtype(op.dtype)
    words = _fragment_order_to_words(op.meta)  # [rows_pad, 2 * ktiles]
    rows_pad = op.rows_pad
    shifts = 4 * torch.arange(8, device=words.device)
    nibbles = ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(rows_pad, -1)  # one per chunk
    vals = op.vals.double()
    if size == 2:
        i0, i1 = nibbles & 3, nibbles >> 2
        if bool((i0 >= i1).any()):
            bad = (i0 >= i1).nonzero()[0].tolist()
            raise ValueError(f"invalid 16-bit metadata (i0 >= i1) at row {bad[0]}, chunk {bad[1]}")
        v = vals.reshape(rows_pad, -1, 2)
        dense = torch.zeros(rows_pad, nibbles.shape[1], 4, dtype=torch.float64, device=vals.device)
        dense.scatter_(-1, i0.unsqueeze(-1), v[..., :1])
        dense.scatter_add_(-1, i1.unsqueeze(-1), v[..., 1:])
        dense = dense.reshape(rows_pad, -1)
    else:
        if bool(((nibbles != 0x4) & (nibbles != 0xE)).any()):
            raise ValueError("invalid tf32 metadata (a nibble other than 0x4 and 0xE)")
        index = (nibbles == 0xE).to(torch.int64)
        dense = torch.zeros(rows_pad, nibbles.shape[1], 2, dtype=torch.float64, device=vals.device)
        dense.scatter_(-1, index.unsqueeze(-1), vals.reshape(rows_pad, -1, 1))
        dense = dense.reshape(rows_pad, -1)
    parts = op.ktiles // op.b_ktiles
    width = dense.shape[1] // parts
    if parts > 1 and parts_summed:
        dense = sum(dense[:, i * width:(i + 1) * width] for i in range(parts))
    return dense[:op.rows, :op.k]
