"""The ``swat::`` torch ops: Sparse Weight Activation Training (SWAT, NeurIPS 2020).

Why ops and not hand-written autograd Functions: dynamo and AOT autograd see one opaque
call per layer (forward and backward each an op with a fake implementation), so a SWAT model
trains under ``torch.compile`` and DDP. The number of kept activations is data-dependent
(an unbacked size): ``torch.compile(fullgraph=True)`` captures it in one graph, otherwise
dynamo breaks the graph at each layer. The top-K thresholds live in tensors the caller owns
(module buffers); :func:`refresh_thresholds` rewrites them in place every ``period`` steps,
so there are no files and no global state.

What a SWAT layer computes
--------------------------
- forward: ``y = W_k x`` with ``W_k`` the weight reduced to its top-K magnitudes; ``x`` dense;
- grad of ``x``: from ``W_k`` and the dense output gradient;
- grad of ``W``: from ``x_k`` (``x`` reduced to its top-K magnitudes) and the dense output
  gradient. ``x_k`` is what autograd saves, compressed: its nonzero values plus a bitmask
  packed 8 per byte (``density * 4 + 1/8`` bytes per fp32 activation instead of 4).

Structures
----------
``"unstructured"``: weights and activations are masked value by value, ``|v| >= threshold``.
``"channel"``: a weight input channel is scored by the mean ``|W[:, c]|`` over all filters
(and kernel positions) and kept or removed for every filter at once; an activation channel
is one sample's feature map ``x[b, c]`` (one value for a linear layer), scored by its mean
``|x|``. Keeping activation channels per sample makes the choice independent of how a
batch is split across data-parallel ranks. With groups = 1 the forward and the input
gradient run on the kept input channels only (the work the channel structure saves).

Zeros are never stored: an activation is kept when its score passes the threshold and is
nonzero, so a layer whose input has fewer nonzeros than K saves fewer values.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .autocast import register_autocast_like_linear
from .projection import owned

__all__ = [
    "STRUCTURES",
    "check_structure",
    "topk_count",
    "weight_scores",
    "activation_scores",
    "mask_weight",
    "weight_mask",
    "activation_mask",
    "pack_bits",
    "unpack_bits",
    "compress_activation",
    "decompress_activation",
    "kth_largest",
    "refresh_thresholds",
    "swat_linear",
    "swat_conv2d",
    "swat_conv_transpose",
    "in_channel_view",
    "mask_transposed_weight",
    "swat_relu",
]

STRUCTURES = ("unstructured", "channel")


def check_structure(structure, *, what: str = "structure") -> str:
    """Return ``structure`` if it is a known SWAT structure, else raise a ValueError."""
    if structure not in STRUCTURES:
        raise ValueError(f"{what}={structure!r} is not supported: use one of {STRUCTURES}")
    return structure


def topk_count(density: float, n: int) -> int:
    """K for a tensor of ``n`` scores at ``density``: ``round(density * n)``, at least 1."""
    return min(n, max(1, int(round(float(density) * n))))


# ---------------------------------------------------------------- scores and masks


def weight_scores(weight: Tensor, structure: str) -> Tensor:
    """The magnitudes the weight top-K ranks: ``|W|``, or per input channel the mean ``|W[:, c]|``."""
    if structure == "unstructured":
        return weight.abs()
    dims = [d for d in range(weight.dim()) if d != 1]
    return weight.abs().mean(dims)


def weight_mask(weight: Tensor, threshold: Tensor, structure: str) -> Tensor:
    """Boolean mask of kept weights, broadcastable to ``weight``."""
    keep = weight_scores(weight, structure) >= threshold
    if structure == "unstructured":
        return keep
    return keep.view(1, -1, *([1] * (weight.dim() - 2)))


def mask_weight(weight: Tensor, threshold: Tensor, structure: str) -> Tensor:
    """``W_k``: the weight with every value (or input channel) below ``threshold`` zeroed."""
    return weight * weight_mask(weight, threshold, structure)


def activation_scores(x: Tensor, structure: str, channel_dim: int) -> Tensor:
    """The magnitudes the activation top-K ranks: ``|x|``, or mean ``|x[b, c]|`` per sample channel.

    For ``channel`` the result has ``x``'s dims up to and including ``channel_dim``.
    """
    if structure == "unstructured":
        return x.abs()
    channel_dim = channel_dim % x.dim()
    trailing = list(range(channel_dim + 1, x.dim()))
    return x.abs().mean(trailing) if trailing else x.abs()


def activation_mask(x: Tensor, threshold: Tensor, structure: str, channel_dim: int) -> Tensor:
    """Boolean mask of the kept activations, shaped like the scores (see :func:`activation_scores`)."""
    scores = activation_scores(x, structure, channel_dim)
    return (scores >= threshold) & (scores > 0)


def _expand_to(mask: Tensor, shape) -> Tensor:
    """Broadcast a per-sample-channel mask over the trailing (spatial) dims of ``shape``."""
    if mask.dim() == len(shape):
        return mask
    return mask.view(*mask.shape, *([1] * (len(shape) - mask.dim()))).expand(shape)


# ---------------------------------------------------------------- compressed storage
# Bit packing works on 8 flags at a time as one little-endian int64 (x86, ARM, CUDA); the
# constants are built per call: module-level tensors would leak into traced backward graphs.

def pack_bits(mask: Tensor) -> Tensor:
    """A boolean tensor as a flat uint8 tensor, 8 flags per byte, little-endian within a byte."""
    flat = mask.reshape(-1).contiguous().view(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    elif flat.storage_offset() % 8:
        flat = flat.clone()  # an int64 view needs 8-byte alignment
    # one multiply gathers the 0/1 bytes of an int64 into its top byte
    # (the partial products land on distinct bits, so there are no carries)
    words = flat.view(torch.int64)
    return ((words * 0x0102040810204080) >> 56).to(torch.uint8)


def unpack_bits(bits: Tensor, shape) -> Tensor:
    """Inverse of :func:`pack_bits`: the boolean tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= d
    # copy each byte into all 8 bytes of an int64, keep bit i in byte i: byte i != 0 iff flag i
    spread = bits.to(torch.int64) * 0x0101010101010101
    picked = spread & _bit_select(bits.device)
    return picked.view(torch.uint8)[:n].view(shape).bool()


def _bit_select(device) -> Tensor:
    # 0x8040201008040201 as a signed int64
    return torch.tensor(0x8040201008040201 - (1 << 64), dtype=torch.int64, device=device)


def compress_activation(
    x: Tensor, threshold: Tensor, structure: str, channel_dim: int
) -> Tuple[Tensor, Tensor]:
    """``(values, bits)``: the kept activations in row-major order and the packed mask.

    The mask is per value (``unstructured``) or per sample channel (``channel``).
    """
    mask = activation_mask(x, threshold, structure, channel_dim)
    values = x.masked_select(_expand_to(mask, x.shape))
    return values, pack_bits(mask)


def decompress_activation(
    values: Tensor, bits: Tensor, shape, structure: str, channel_dim: int
) -> Tensor:
    """``x_k``, dense: the saved values at their positions, zeros elsewhere."""
    shape = list(shape)
    if structure == "unstructured":
        mask_shape = shape
    else:
        mask_shape = shape[: (channel_dim % len(shape)) + 1]
    mask = _expand_to(unpack_bits(bits, mask_shape), shape)
    return values.new_zeros(shape).masked_scatter(mask, values)


# ---------------------------------------------------------------- thresholds


def _distributed_world() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def kth_largest(scores: Tensor, density: float, *, sync: bool = False) -> Tensor:
    """The threshold that keeps the top ``round(density * n)`` of ``scores`` (a 0-dim tensor).

    With ``sync`` and an initialised process group, ``n`` and the top-K are taken over the
    scores of all ranks (each rank contributes its local top-K candidates, which must hold
    the global top-K), so every rank gets the threshold one process would get on the whole
    batch.
    """
    flat = scores.detach().reshape(-1)
    world = _distributed_world() if sync else 1
    if world == 1:
        k = topk_count(density, flat.numel())
        return torch.kthvalue(flat, flat.numel() - k + 1).values
    import torch.distributed as dist

    n = torch.tensor([flat.numel()], dtype=torch.int64)
    dist.all_reduce(n)
    k = topk_count(density, int(n.item()))
    local = torch.topk(flat, min(k, flat.numel()), sorted=False).values
    if local.numel() < k:
        # scores are magnitudes (>= 0): padding with -1 never enters the top-K
        local = torch.cat([local, local.new_full((k - local.numel(),), -1.0)])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local.contiguous())
    candidates = torch.cat(gathered)
    return torch.kthvalue(candidates, candidates.numel() - k + 1).values


@torch.library.custom_op(
    "swat::refresh_thresholds",
    mutates_args=("weight_threshold", "activation_threshold", "step"),
)
def refresh_thresholds(
    x: Tensor,
    weight: Tensor,
    weight_threshold: Tensor,
    activation_threshold: Tensor,
    step: Tensor,
    period: int,
    weight_density: float,
    activation_density: float,
    structure: str,
    channel_dim: int,
    sync: bool,
) -> None:
    """Count one training step; on every ``period``-th (step 0 included) recompute both thresholds.

    The weight threshold keeps the top ``weight_density`` of :func:`weight_scores`, the
    activation threshold the top ``activation_density`` of :func:`activation_scores` of this
    batch ``x`` (over all ranks when ``sync``). In between they are reused unchanged.
    """
    if int(step.item()) % period == 0:
        with torch.no_grad():
            w_thr = kth_largest(weight_scores(weight, structure), weight_density)
            a_thr = kth_largest(
                activation_scores(x, structure, channel_dim), activation_density, sync=sync
            )
            weight_threshold.copy_(w_thr)
            activation_threshold.copy_(a_thr)
    step.add_(1)


@refresh_thresholds.register_fake
def _(x, weight, weight_threshold, activation_threshold, step, period, weight_density,
      activation_density, structure, channel_dim, sync):
    return None


# ---------------------------------------------------------------- linear


def _kept_channels(weight: Tensor, threshold: Tensor, structure: str) -> Optional[Tensor]:
    """Indices of the kept input channels when the channel structure lets the GEMM skip the
    others, else None (unstructured, nothing removed, or nothing kept)."""
    if structure != "channel":
        return None
    idx = torch.nonzero(weight_scores(weight, structure) >= threshold).flatten()
    if idx.numel() == 0 or idx.numel() == weight.shape[1]:
        return None
    return idx


def _fake_compressed(x: Tensor, structure: str, channel_dim: int) -> Tuple[Tensor, Tensor]:
    """Fake ``(values, bits)``: the number of kept values is only known at run time."""
    n_values = torch.library.get_ctx().new_dynamic_size()
    if structure == "unstructured":
        n_flags = x.numel()
    else:
        n_flags = 1
        for s in x.shape[: (channel_dim % x.dim()) + 1]:
            n_flags = n_flags * s
    return x.new_empty(n_values), x.new_empty((n_flags + 7) // 8, dtype=torch.uint8)


@torch.library.custom_op("swat::linear", mutates_args=())
def _swat_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_threshold: Tensor,
    activation_threshold: Tensor,
    structure: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(F.linear(x, W_k, bias), values, bits)``: the output and the compressed ``x_k``.

    With the channel structure the GEMM reads only the kept input channels.
    """
    idx = _kept_channels(weight, weight_threshold, structure)
    if idx is None:
        y = F.linear(x, mask_weight(weight, weight_threshold, structure), bias)
    else:
        y = F.linear(x.index_select(-1, idx), weight.index_select(1, idx), bias)
    values, bits = compress_activation(x, activation_threshold, structure, -1)
    return owned(y), values, bits


@_swat_linear.register_fake
def _(x, weight, bias, weight_threshold, activation_threshold, structure):
    values, bits = _fake_compressed(x, structure, -1)
    return x.new_empty((*x.shape[:-1], weight.shape[0])), values, bits


def _linear_setup(ctx, inputs, output):
    x, weight, bias, weight_threshold, _, structure = inputs
    _, values, bits = output
    # autograd keeps only the compressed activation; the weight is the parameter itself
    ctx.save_for_backward(weight, weight_threshold, values, bits)
    ctx.x_shape = x.shape
    ctx.structure = structure
    ctx.mark_non_differentiable(values, bits)


@torch.library.custom_op("swat::linear_backward", mutates_args=())
def _swat_linear_backward(
    grad: Tensor,
    weight: Tensor,
    weight_threshold: Tensor,
    values: Tensor,
    bits: Tensor,
    x_shape: List[int],
    structure: str,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_w, grad_b)`` of ``swat::linear``; an unneeded one is an empty tensor.

    An op of its own so that traced backward graphs see no data-dependent shapes.
    """
    # one empty tensor per unneeded gradient: a custom op's outputs must not alias each other
    grad_x, grad_w, grad_b = grad.new_empty(0), grad.new_empty(0), grad.new_empty(0)
    grad2d = grad.reshape(-1, grad.shape[-1])
    if need_x:
        idx = _kept_channels(weight, weight_threshold, structure)
        if idx is None:
            grad_x = grad.matmul(mask_weight(weight, weight_threshold, structure))
        else:
            grad_x = grad.new_zeros(x_shape).index_copy_(
                -1, idx, grad.matmul(weight.index_select(1, idx)))
    if need_w:
        x_k = decompress_activation(values, bits, x_shape, structure, -1)
        grad_w = grad2d.t().matmul(x_k.reshape(-1, x_k.shape[-1]))
    if need_b:
        grad_b = grad2d.sum(0)
    return grad_x, grad_w, grad_b


@_swat_linear_backward.register_fake
def _(grad, weight, weight_threshold, values, bits, x_shape, structure, need_x, need_w, need_b):
    return (grad.new_empty(x_shape) if need_x else grad.new_empty(0),
            weight.new_empty(weight.shape) if need_w else grad.new_empty(0),
            grad.new_empty(grad.shape[-1]) if need_b else grad.new_empty(0))


HIGHER_ORDER_REFUSAL = (
    "SWAT's backward is its training gradient, whose weight gradient comes from the top-K activations, not "
    "from the input the forward read: it is not the derivative of the forward, and backward(create_graph=True), "
    "torch.func transforms (grad, jacrev, jvp, vmap of grad) and forward-mode AD cannot differentiate it. "
    "Run them on the model in eval mode, where each SWAT layer is F.linear / F.conv2d with its top-K "
    "weight (exact to differentiate), or on the dense model.")


def refuse_higher_order(what: str) -> None:
    """Raise where SWAT's training op meets a use that differentiates its backward."""
    raise RuntimeError(f"{what}: {HIGHER_ORDER_REFUSAL}")


def _linear_backward(ctx, grad, _grad_values, _grad_bits):
    if torch.is_grad_enabled():  # create_graph=True
        refuse_higher_order("swat::linear backward with create_graph=True")
    weight, weight_threshold, values, bits = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grads = torch.ops.swat.linear_backward(grad, weight, weight_threshold, values, bits,
                                           list(ctx.x_shape), ctx.structure, *need)
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None)


_swat_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


def swat_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_threshold: Tensor,
    activation_threshold: Tensor,
    structure: str = "unstructured",
) -> Tensor:
    """SWAT linear layer: forward with ``W_k``, backward with ``W_k`` and the saved ``x_k``."""
    return torch.ops.swat.linear(
        x, weight, bias, weight_threshold, activation_threshold, structure
    )[0]


# ---------------------------------------------------------------- conv2d (and conv3d)
# ``swat::conv2d`` and its backward take a 4-D (conv2d) or 5-D (conv3d) weight, as ``sas::conv2d``
# does: the scores, masks and compressed storage are the same along any number of spatial dims.


def _conv_output_size(size, kernel: int, stride: int, padding: int, dilation: int):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_fn(weight: Tensor):
    return F.conv3d if weight.dim() == 5 else F.conv2d


@torch.library.custom_op("swat::conv2d", mutates_args=())
def _swat_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_threshold: Tensor,
    activation_threshold: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    structure: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(F.conv2d(x, W_k, bias, ...), values, bits)``: the output and the compressed ``x_k``
    (``F.conv3d`` for a 5-D weight).

    With the channel structure (groups = 1) the convolution reads only the kept input channels.
    """
    conv = _conv_fn(weight)
    idx = _kept_channels(weight, weight_threshold, structure) if groups == 1 else None
    if idx is None:
        w_k = mask_weight(weight, weight_threshold, structure)
        y = conv(x, w_k, bias, stride, padding, dilation, groups)
    else:
        y = conv(x.index_select(1, idx), weight.index_select(1, idx), bias, stride, padding, dilation)
    values, bits = compress_activation(x, activation_threshold, structure, 1)
    return owned(y), values, bits


@_swat_conv2d.register_fake
def _(x, weight, bias, weight_threshold, activation_threshold, stride, padding, dilation,
      groups, structure):
    spatial = [_conv_output_size(x.shape[2 + i], k, stride[i], padding[i], dilation[i])
               for i, k in enumerate(weight.shape[2:])]
    values, bits = _fake_compressed(x, structure, 1)
    return x.new_empty((x.shape[0], weight.shape[0], *spatial)), values, bits


def _conv_setup(ctx, inputs, output):
    x, weight, bias, weight_threshold, _, stride, padding, dilation, groups, structure = inputs
    _, values, bits = output
    ctx.save_for_backward(weight, weight_threshold, values, bits)
    ctx.x_shape = x.shape
    ctx.conf = (list(stride), list(padding), list(dilation), groups)
    ctx.structure = structure
    ctx.bias_sizes = None if bias is None else list(bias.shape)
    ctx.mark_non_differentiable(values, bits)


@torch.library.custom_op("swat::conv2d_backward", mutates_args=())
def _swat_conv2d_backward(
    grad: Tensor,
    weight: Tensor,
    weight_threshold: Tensor,
    values: Tensor,
    bits: Tensor,
    x_shape: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    structure: str,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_w, grad_b)`` of ``swat::conv2d``; an unneeded one is an empty tensor."""
    grad = grad.contiguous()
    no_output_padding = [0] * (weight.dim() - 2)
    x_k = decompress_activation(values, bits, x_shape, structure, 1)
    bias_sizes = [weight.shape[0]] if need_b else None
    idx = _kept_channels(weight, weight_threshold, structure) if groups == 1 else None
    if idx is not None and need_x:
        # the removed input channels get zero gradient: compute only the kept ones
        shape = list(x_shape)
        shape[1] = idx.numel()
        conv_input = torch.nn.grad.conv3d_input if weight.dim() == 5 else torch.nn.grad.conv2d_input
        grad_sub = conv_input(shape, weight.index_select(1, idx), grad, stride, padding, dilation)
        grad_x = grad.new_zeros(x_shape).index_copy_(1, idx, grad_sub)
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x_k, weight, bias_sizes, stride, padding, dilation, False, no_output_padding, groups,
            [False, need_w, need_b])
    else:
        # one call: grad_x only reads W_k (and x's shape), grad_w only reads x_k
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x_k, mask_weight(weight, weight_threshold, structure), bias_sizes, stride,
            padding, dilation, False, no_output_padding, groups, [need_x, need_w, need_b])
    # one empty tensor per unneeded gradient: a custom op's outputs must not alias each other
    return (grad_x if need_x else grad.new_empty(0), grad_w if need_w else grad.new_empty(0),
            grad_b if need_b else grad.new_empty(0))


@_swat_conv2d_backward.register_fake
def _(grad, weight, weight_threshold, values, bits, x_shape, stride, padding, dilation, groups,
      structure, need_x, need_w, need_b):
    return (grad.new_empty(x_shape) if need_x else grad.new_empty(0),
            weight.new_empty(weight.shape) if need_w else grad.new_empty(0),
            grad.new_empty(weight.shape[0]) if need_b else grad.new_empty(0))


def _conv_backward(ctx, grad, _grad_values, _grad_bits):
    if torch.is_grad_enabled():  # create_graph=True
        refuse_higher_order("swat::conv2d backward with create_graph=True")
    weight, weight_threshold, values, bits = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conf
    need = list(ctx.needs_input_grad[:3])
    need[2] = need[2] and ctx.bias_sizes is not None
    grads = torch.ops.swat.conv2d_backward(grad, weight, weight_threshold, values, bits,
                                           list(ctx.x_shape), stride, padding, dilation, groups,
                                           ctx.structure, *need)
    return (*(g if n else None for g, n in zip(grads, need)), *([None] * 7))


_swat_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)

# under torch.autocast the GEMM operands (x, weight, bias) are cast as for aten::linear;
# the thresholds stay float32
_autocast_library = torch.library.Library("swat", "IMPL")
register_autocast_like_linear(torch.ops.swat.linear, (0, 1, 2), _autocast_library)
register_autocast_like_linear(torch.ops.swat.conv2d, (0, 1, 2), _autocast_library)


def swat_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_threshold: Tensor,
    activation_threshold: Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int = 1,
    structure: str = "unstructured",
) -> Tensor:
    """SWAT conv2d layer (symmetric integer padding): forward with ``W_k``, backward with ``x_k``;
    a 5-D weight (and input) is a conv3d."""
    return torch.ops.swat.conv2d(
        x, weight, bias, weight_threshold, activation_threshold,
        list(stride), list(padding), list(dilation), groups, structure,
    )[0]


# ---------------------------------------------------------------- conv_transpose (1d/2d/3d)
# A transposed convolution stores its weight ``[in, out/groups, *kernel]``: its scores and masks
# are taken on the ``[out/groups, in, *kernel]`` view (``in_channel_view``), whose dim 1 is the
# input channel as a convolution's is, so the channel structure ranks input channels here too.


def in_channel_view(weight: Tensor) -> Tensor:
    """A transposed convolution's weight with its input channels on dim 1 (a view, no copy)."""
    return weight.transpose(0, 1)


def mask_transposed_weight(weight: Tensor, threshold: Tensor, structure: str) -> Tensor:
    """``W_k`` of a transposed convolution's ``[in, out/groups, *kernel]`` weight."""
    return in_channel_view(mask_weight(in_channel_view(weight), threshold, structure))


def _conv_transpose_fn(weight: Tensor):
    return (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[weight.dim() - 3]


@torch.library.custom_op("swat::conv_transpose", mutates_args=())
def _swat_conv_transpose(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_threshold: Tensor,
    activation_threshold: Tensor,
    stride: List[int],
    padding: List[int],
    output_padding: List[int],
    dilation: List[int],
    groups: int,
    structure: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(F.conv_transpose{1,2,3}d(x, W_k, bias, ...), values, bits)``: the output and the compressed ``x_k``."""
    w_k = mask_transposed_weight(weight, weight_threshold, structure)
    y = _conv_transpose_fn(weight)(x, w_k, bias, stride, padding, output_padding, groups, dilation)
    values, bits = compress_activation(x, activation_threshold, structure, 1)
    return owned(y), values, bits


@_swat_conv_transpose.register_fake
def _(x, weight, bias, weight_threshold, activation_threshold, stride, padding, output_padding, dilation,
      groups, structure):
    spatial = [(x.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k - 1) + output_padding[i] + 1
               for i, k in enumerate(weight.shape[2:])]
    values, bits = _fake_compressed(x, structure, 1)
    return x.new_empty((x.shape[0], weight.shape[1] * groups, *spatial)), values, bits


def _conv_transpose_setup(ctx, inputs, output):
    x, weight, bias, weight_threshold, _, stride, padding, output_padding, dilation, groups, structure = inputs
    _, values, bits = output
    ctx.save_for_backward(weight, weight_threshold, values, bits)
    ctx.x_shape = x.shape
    ctx.conf = (list(stride), list(padding), list(output_padding), list(dilation), groups)
    ctx.structure = structure
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(values, bits)


@torch.library.custom_op("swat::conv_transpose_backward", mutates_args=())
def _swat_conv_transpose_backward(
    grad: Tensor,
    weight: Tensor,
    weight_threshold: Tensor,
    values: Tensor,
    bits: Tensor,
    x_shape: List[int],
    stride: List[int],
    padding: List[int],
    output_padding: List[int],
    dilation: List[int],
    groups: int,
    structure: str,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_w, grad_b)`` of ``swat::conv_transpose``; an unneeded one is an empty tensor.

    One ``convolution_backward`` call: its input gradient reads only ``W_k``, its weight gradient
    only ``x_k``."""
    x_k = decompress_activation(values, bits, x_shape, structure, 1)
    bias_sizes = [weight.shape[1] * groups] if need_b else None
    grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad.contiguous(), x_k, mask_transposed_weight(weight, weight_threshold, structure), bias_sizes, stride,
        padding, dilation, True, output_padding, groups, [need_x, need_w, need_b])
    return (grad_x if need_x else grad.new_empty(0), grad_w if need_w else grad.new_empty(0),
            grad_b if need_b else grad.new_empty(0))


@_swat_conv_transpose_backward.register_fake
def _(grad, weight, weight_threshold, values, bits, x_shape, stride, padding, output_padding, dilation, groups,
      structure, need_x, need_w, need_b):
    return (grad.new_empty(x_shape) if need_x else grad.new_empty(0),
            weight.new_empty(weight.shape) if need_w else grad.new_empty(0),
            grad.new_empty(weight.shape[1] * groups) if need_b else grad.new_empty(0))


def _conv_transpose_backward(ctx, grad, _grad_values, _grad_bits):
    if torch.is_grad_enabled():  # create_graph=True
        refuse_higher_order("swat::conv_transpose backward with create_graph=True")
    weight, weight_threshold, values, bits = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:3])
    need[2] = need[2] and ctx.has_bias
    grads = torch.ops.swat.conv_transpose_backward(grad, weight, weight_threshold, values, bits, list(ctx.x_shape),
                                                   *ctx.conf, ctx.structure, *need)
    return (*(g if n else None for g, n in zip(grads, need)), *([None] * 8))


_swat_conv_transpose.register_autograd(_conv_transpose_backward, setup_context=_conv_transpose_setup)
register_autocast_like_linear(torch.ops.swat.conv_transpose, (0, 1, 2), _autocast_library)


def swat_conv_transpose(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    weight_threshold: Tensor,
    activation_threshold: Tensor,
    stride: List[int],
    padding: List[int],
    output_padding: List[int],
    dilation: List[int],
    groups: int = 1,
    structure: str = "unstructured",
) -> Tensor:
    """SWAT transposed convolution (1d/2d/3d by the weight's rank): forward with ``W_k``, backward
    with ``W_k`` for the input gradient and the saved ``x_k`` for the weight gradient. The weight
    threshold is one of the scores of :func:`in_channel_view` of the weight."""
    return torch.ops.swat.conv_transpose(
        x, weight, bias, weight_threshold, activation_threshold,
        list(stride), list(padding), list(output_padding), list(dilation), groups, structure,
    )[0]


# ---------------------------------------------------------------- relu


@torch.library.custom_op("swat::relu", mutates_args=())
def _swat_relu(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(relu(x), bits)``: the output and its nonzero pattern packed 8 per byte."""
    y = torch.relu(x)
    return y, pack_bits(y > 0)


@_swat_relu.register_fake
def _(x):
    return torch.empty_like(x), x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


def _relu_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.x_shape = inputs[0].shape
    ctx.mark_non_differentiable(output[1])


def _relu_backward(ctx, grad, _grad_bits):
    bits, = ctx.saved_tensors
    return grad * unpack_bits(bits, ctx.x_shape)


_swat_relu.register_autograd(_relu_backward, setup_context=_relu_setup)


def swat_relu(x: Tensor) -> Tensor:
    """``relu(x)`` whose backward keeps 1 bit per value instead of the output itself.

    Why: a layer's input is usually a ReLU output, and ``torch.relu`` saves that output for
    its backward, which would keep the dense activation alive next to SWAT's compressed copy.
    """
    return torch.ops.swat.relu(x)[0]
