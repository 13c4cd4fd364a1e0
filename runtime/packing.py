"""Packed 2:4 formats: the runtime's SWS weight format and the CUTLASS layout of an SAS activation.

Why this module exists: Sparse Tensor Cores read operand A as 2:4 sparse data, compressed
values plus 2-bit positions. Two producers need that format:

* an SWS weight (1:M masked, M = 2 or 4; 1:4 is stored as 2:4 with explicit zeros) is packed
  once into :class:`PackedSparseWeight`, the row-major format the runtime's kernels read;
* an SAS activation never needs to exist wide: its compressed values are ``|x|`` and its
  positions are a function of the signs. :func:`pack_sas_activation_cutlass` builds, from the
  narrow activation, exactly what PyTorch's CUTLASS converter returns for the projected
  (wide) activation, so ``torch._sparse_semi_structured_mm`` can serve as a second GPU path
  and as an independent check of the SAS kernels (runtime/cuda: compress + sparse GEMM).

Both formats share one choice of kept positions per group of 4 (:data:`_POSITIONS_BY_MASK`):
the one CUTLASS tooling in PyTorch makes, so a packed weight equals PyTorch's CUTLASS pack of
its dense form after :func:`cutlass_reorder_meta`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from .projection import check_M, get_rule

__all__ = [
    "PackedSparseWeight",
    "pack_sws_weight",
    "unpack_sws_weight",
    "cutlass_reorder_meta",
    "packed_to_cutlass",
    "pack_sas_activation_cutlass",
]

# Kept positions (i0 < i1) for every nonzero pattern of a group of 4 with at most 2 nonzeros,
# keyed by the 4-bit mask (bit p set = position p nonzero). Groups with fewer nonzeros keep
# explicit zeros; the fill positions are the ones PyTorch's CUTLASS converter picks.
_POSITIONS_BY_MASK = {
    0b0000: (2, 3),
    0b0001: (0, 2),
    0b0010: (1, 2),
    0b0100: (2, 3),
    0b1000: (2, 3),
    0b0011: (0, 1),
    0b0101: (0, 2),
    0b0110: (1, 2),
    0b1001: (0, 3),
    0b1010: (1, 3),
    0b1100: (2, 3),
}


def code_table(device) -> Tensor:
    """int64 [16]: 4-bit metadata code (i0 | i1 << 2) per mask; -1 for masks with > 2 nonzeros."""
    table = torch.full((16,), -1, dtype=torch.int64)
    for mask, (i0, i1) in _POSITIONS_BY_MASK.items():
        table[mask] = i0 | (i1 << 2)
    return table.to(device)


def _nibbles_to_words(codes: Tensor) -> Tensor:
    """[R, G] 4-bit codes -> [R, G // 4] int16 words holding groups 4w..4w+3 at bits 4j."""
    rows, groups = codes.shape
    shifts = torch.arange(0, 16, 4, device=codes.device, dtype=torch.int64)
    words = (codes.reshape(rows, groups // 4, 4) << shifts).sum(-1)
    # uint16 bit patterns stored in int16: wrap explicitly rather than rely on a cast
    words = torch.where(words >= 1 << 15, words - (1 << 16), words)
    return words.to(torch.int16)


def _words_to_nibbles(words: Tensor) -> Tensor:
    """Inverse of :func:`_nibbles_to_words`: [R, W] int16 -> [R, 4 W] int64 codes."""
    rows, count = words.shape
    unsigned = words.to(torch.int64) & 0xFFFF
    shifts = torch.arange(0, 16, 4, device=words.device, dtype=torch.int64)
    return ((unsigned.unsqueeze(-1) >> shifts) & 0xF).reshape(rows, count * 4)


@dataclass
class PackedSparseWeight:
    """A 2:4-packed weight in the runtime's row-major format (the kernels read exactly this).

    ``shape = (N, K)`` is the dense weight's shape; ``Kp`` is K rounded up to a multiple of
    16, zero padded. Per row, each aligned group of 4 columns ``4q..4q+3`` stores 2 values at
    ``values[:, 2q]`` and ``values[:, 2q + 1]`` whose in-group indices are ``i0 < i1``
    (explicit zeros fill groups with fewer nonzeros). Meta word ``w`` of a row holds groups
    ``4w..4w+3``, group ``j`` in bits ``[4j, 4j + 4)``: low 2 bits ``i0``, next 2 bits ``i1``.

    ``values``: [N, Kp // 2], the weight's dtype. ``meta``: [N, Kp // 16] torch.int16 holding
    uint16 bit patterns. ``M``: the 1:M pattern the weight came from, if known.
    """

    values: Tensor
    meta: Tensor
    shape: Tuple[int, int]
    M: Optional[int] = None

    @property
    def padded_k(self) -> int:
        """Kp: the dense width rounded up to a multiple of 16."""
        return self.values.shape[1] * 2

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, *args, **kwargs) -> "PackedSparseWeight":
        """Move to a device / cast the values (``meta`` keeps its int16 bit patterns)."""
        values = self.values.to(*args, **kwargs)
        meta = self.meta.to(device=values.device)
        return PackedSparseWeight(values, meta, self.shape, self.M)


def pack_sws_weight(weight: Tensor, M: Optional[int] = None) -> PackedSparseWeight:
    """Pack a masked (1:M or any 2:4-compatible) weight ``[N, K]`` into :class:`PackedSparseWeight`.

    Every aligned group of 4 columns of a row may hold at most 2 nonzeros; otherwise a
    ValueError names the first offending row and column group. ``M`` is recorded (and must be
    a power of two >= 2 when given); 1:2 is valid 2:4 as is, and 1:4 is stored as 2:4 with one
    explicit zero per group.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(
            f"pack_sws_weight: weight must be a torch.Tensor, got {type(weight).__name__}"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"pack_sws_weight: weight must be 2-D [N, K] (a linear weight; flatten a conv "
            f"weight to [out, in*kh*kw] first), got shape {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise ValueError(f"pack_sws_weight: weight must be floating point, got {weight.dtype}")
    if M is not None:
        check_M(M, what="pack_sws_weight: M")
    n, k = weight.shape
    if k == 0:
        raise ValueError("pack_sws_weight: weight has K = 0 columns; nothing to pack")
    kp = -(-k // 16) * 16
    dense = torch.nn.functional.pad(weight.detach(), (0, kp - k)) if kp != k else weight.detach()
    groups = dense.reshape(n, kp // 4, 4)
    nonzero = groups != 0
    count = nonzero.sum(-1)
    if n and bool((count > 2).any()):
        bad = (count > 2).nonzero()
        row, group = (int(v) for v in bad[0])
        raise ValueError(
            f"pack_sws_weight: weight row {row}, columns {4 * group}..{4 * group + 3} hold "
            f"{int(count[row, group])} nonzeros ({bad.shape[0]} such groups in all): the weight "
            "is not 2:4-compatible (at most 2 nonzeros per aligned group of 4 columns in a row). "
            f"A 1:M weight fits when its 1:M chunks lie inside rows and on groups of 4 "
            f"(K % M == 0); they straddle rows when K % M != 0 (here K = {k}"
            + (f", M = {M})" if M is not None else ")")
        )
    shifts = torch.arange(4, device=weight.device, dtype=torch.int64)
    mask = (nonzero.to(torch.int64) << shifts).sum(-1)
    codes = code_table(weight.device)[mask]
    positions = torch.stack((codes & 3, codes >> 2), dim=-1)
    values = groups.gather(-1, positions).reshape(n, kp // 2).contiguous()
    return PackedSparseWeight(values, _nibbles_to_words(codes), (n, k), M)


def unpack_sws_weight(packed: PackedSparseWeight) -> Tensor:
    """The dense ``[N, K]`` weight of a :class:`PackedSparseWeight` (exact inverse of packing)."""
    if not isinstance(packed, PackedSparseWeight):
        raise TypeError(
            f"unpack_sws_weight: expected a PackedSparseWeight, got {type(packed).__name__}"
        )
    n, k = packed.shape
    kp = packed.padded_k
    codes = _words_to_nibbles(packed.meta)
    if codes.shape != (n, kp // 4):
        raise ValueError(
            f"unpack_sws_weight: meta has shape {tuple(packed.meta.shape)}, expected "
            f"({n}, {kp // 16}) for values of shape {tuple(packed.values.shape)}"
        )
    positions = torch.stack((codes & 3, codes >> 2), dim=-1)
    dense = packed.values.new_zeros((n, kp // 4, 4))
    dense.scatter_(-1, positions, packed.values.reshape(n, kp // 4, 2))
    return dense.reshape(n, kp)[:, :k]


def cutlass_reorder_meta(meta: Tensor) -> Tensor:
    """Row-major int16 metadata ``[m, n]`` -> the order CUTLASS's sparse GEMM reads.

    CUTLASS stores int16 metadata ColumnMajorInterleaved<2> after permuting rows within
    blocks of 32 (row ``32a + 8h + l`` goes to ``32a + 4l + h``) and transposing 2x2
    blocks. Written as one view + permute: row ``r = 32a + 16h1 + 8h0 + l``, column
    ``c = 2j + q`` lands at flat offset ``2m j + 64a + 8l + 4h1 + 2q + h0``.
    Needs ``m % 32 == 0`` and ``n`` even.
    """
    if meta.dim() != 2 or meta.dtype != torch.int16:
        raise ValueError(
            f"cutlass_reorder_meta: meta must be a 2-D int16 tensor, got {meta.dtype} "
            f"of shape {tuple(meta.shape)}"
        )
    m, n = meta.shape
    if m % 32 or n % 2:
        raise ValueError(
            f"cutlass_reorder_meta: meta shape {(m, n)} needs rows % 32 == 0 and an even "
            "number of columns (CUTLASS's interleaved metadata tiles)"
        )
    blocks = meta.reshape(m // 32, 2, 2, 8, n // 2, 2)  # (a, h1, h0, l, j, q)
    return blocks.permute(4, 0, 3, 1, 5, 2).reshape(m, n)


def packed_to_cutlass(packed: PackedSparseWeight) -> Tuple[Tensor, Tensor]:
    """``(values, meta)`` of a packed weight, laid out for ``torch._sparse_semi_structured_mm``.

    Equal to ``sparse_semi_structured_from_dense_cutlass(unpack_sws_weight(packed))``; needs a
    16-bit dtype, N % 32 == 0 and K % 32 == 0 (no padding columns).
    """
    n, k = packed.shape
    if packed.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"packed_to_cutlass: CUTLASS 2:4 needs float16 or bfloat16 values, got {packed.dtype}"
        )
    if n % 32 or k % 32:
        raise ValueError(
            f"packed_to_cutlass: weight shape {(n, k)} needs N % 32 == 0 and K % 32 == 0 "
            "(CUTLASS 2:4 tiles); pad the weight"
        )
    return packed.values, cutlass_reorder_meta(packed.meta)


# Per dtype: 16-bit elements per stored element (a float32 pair is one tf32 1:2 unit = a
# group of 4 in 16-bit units) and the wide-width multiple PyTorch's converter accepts.
_CUTLASS_DTYPES = {
    torch.float16: (1, 32),
    torch.bfloat16: (1, 32),
    torch.float32: (2, 16),
}


def pack_sas_activation_cutlass(
    x2d: Tensor, M: int = 2, *, rule: str = "sign_pattern"
) -> Tuple[Tensor, Tensor]:
    """CUTLASS 2:4 ``(values, meta)`` of the projected activation, built from the narrow ``x2d``.

    Equals ``sparse_semi_structured_from_dense_cutlass(project(x2d, M))`` without building the
    wide tensor: the signs give the metadata, ``|x|`` gives the values (for nonzero inputs
    and M = 2 the values are exactly ``|x|``). Accepted, as PyTorch's converter accepts:

    * dtype float16 or bfloat16 (2:4, values [R, M*K/2], meta int16 [R, M*K/16]) with
      ``M*K % 32 == 0``; or float32 (tf32 1:2, values [R, M*K/2], meta int16 [R, M*K/8])
      with ``M*K % 16 == 0``;
    * ``R % 32 == 0`` rows (pad the batch);
    * any M = 2**b (every group of 4 wide columns then holds at most 2 nonzeros).
    """
    if not isinstance(x2d, Tensor) or x2d.dim() != 2:
        raise ValueError(
            "pack_sas_activation_cutlass: x2d must be a 2-D tensor [rows, K], got "
            + (f"shape {tuple(x2d.shape)}" if isinstance(x2d, Tensor) else type(x2d).__name__)
        )
    check_M(M, what="pack_sas_activation_cutlass: M")
    if x2d.dtype not in _CUTLASS_DTYPES:
        raise ValueError(
            f"pack_sas_activation_cutlass: dtype {x2d.dtype} has no CUTLASS 2:4 layout here; "
            "use float16, bfloat16 or float32"
        )
    units, width_multiple = _CUTLASS_DTYPES[x2d.dtype]
    rows, k = x2d.shape
    wide = M * k
    if rows % 32 or rows == 0:
        raise ValueError(
            f"pack_sas_activation_cutlass: x2d has {rows} rows; CUTLASS needs a positive "
            "multiple of 32 (pad the batch)"
        )
    if wide % width_multiple or wide == 0:
        raise ValueError(
            f"pack_sas_activation_cutlass: the wide width M*K = {M}*{k} = {wide} must be a "
            f"positive multiple of {width_multiple} for {x2d.dtype}"
        )
    slot = get_rule(rule, M).slot(x2d, -1).to(torch.int64)
    magnitude = x2d.abs()
    nonzero = (x2d != 0).to(torch.int64)
    # a wide column is `units` 16-bit positions of the group mask: its bit pattern
    column_bits = (1 << units) - 1
    per_group = 4 // units  # wide columns per group of 4 16-bit positions

    if M < per_group:
        # several channels share a group (16-bit, M = 2): channel i owns columns i*M..i*M+M-1
        channels_per_group = per_group // M
        slot_g = slot.reshape(rows, -1, channels_per_group)
        nz_g = nonzero.reshape(rows, -1, channels_per_group)
        offset = torch.arange(channels_per_group, device=x2d.device) * M
        mask = ((nz_g * column_bits) << (units * (offset + slot_g))).sum(-1)
        codes = code_table(x2d.device)[mask]
        kept = torch.stack((codes & 3, codes >> 2), dim=-1) // units  # wide column in group
        owner = kept // M
        value = magnitude.reshape(rows, -1, channels_per_group).gather(-1, owner)
        hit = slot_g.gather(-1, owner) == kept % M
    else:
        # one channel spans M / per_group groups; group j holds its slots j*per_group..
        groups_per_channel = M // per_group
        j = torch.arange(groups_per_channel, device=x2d.device)
        in_group = (slot.unsqueeze(-1) // per_group) == j
        bits = column_bits << (units * (slot % per_group))
        mask = (nonzero * bits).unsqueeze(-1) * in_group
        mask = mask.reshape(rows, -1)
        codes = code_table(x2d.device)[mask]
        kept = torch.stack((codes & 3, codes >> 2), dim=-1) // units
        target = (j * per_group).repeat(k).view(1, -1, 1) + kept
        value = magnitude.repeat_interleave(groups_per_channel, dim=-1).unsqueeze(-1)
        hit = slot.repeat_interleave(groups_per_channel, dim=-1).unsqueeze(-1) == target
    if units == 2:
        # tf32 1:2 keeps one value per pair: the column named by i0
        value, hit = value[..., :1], hit[..., :1]
    values = torch.where(hit, value, torch.zeros((), dtype=x2d.dtype, device=x2d.device))
    values = values.reshape(rows, wide // 2)
    return values, cutlass_reorder_meta(_nibbles_to_words(codes))
