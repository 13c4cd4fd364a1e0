"""The ``sas::`` torch ops: a SAS layer computes ``Wt S(x)`` from the narrow ``x``.

Why ops and not plain Python: dynamo, AOT autograd and inductor see one opaque call per
layer (with a fake implementation for tracing and an autograd formula), and the runtime
can pick a target per device behind it. The CPU implementation builds the projected
activation with one fused select (``projection.project``), never a zero-filled tensor
plus scatter, and calls the dense kernel; the backward recomputes the projection from the
saved narrow input, so autograd holds only the narrow activation.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import autotune
from .autocast import register_autocast_like_linear
from .matmul import sas_matmul, select_target
from .projection import SignPatternRule, get_rule, project, project_aten

__all__ = ["sas_linear", "sas_conv2d", "conv2d_output_size", "sas_conv2d_choice", "projected_linear",
           "projected_conv2d", "projected_conv1d"]


def _slot_grad(grad_wide: Tensor, x: Tensor, M: int, rule: str, dim: int) -> Tensor:
    """d/dx of S(x): the wide gradient at each value's slot, times sign(x) (d|x|/dx, 0 at 0)."""
    per_slot = grad_wide.unflatten(dim, (x.shape[dim], M))
    index_rule = get_rule(rule, M)
    if isinstance(index_rule, SignPatternRule) and M == 2:
        return per_slot.select(dim + 1, 0) * (x > 0) - per_slot.select(dim + 1, 1) * (x < 0)
    slot = index_rule.slot(x, dim)
    grad = per_slot.select(dim + 1, 0) * (slot == 0)
    for m in range(1, M):
        grad.addcmul_(per_slot.select(dim + 1, m), slot == m)
    return grad * torch.sign(x)


# ---------------------------------------------------------------- linear


@torch.library.custom_op("sas::linear", mutates_args=())
def sas_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, rule: str) -> Tensor:
    """``F.linear(S(x), weight, bias)``; ``x`` is narrow ``(..., K)``, ``weight`` is ``(N, M*K)``."""
    return F.linear(project(x, M, -1, rule), weight, bias)


@sas_linear.register_kernel("cuda")
def _(x, weight, bias, M, rule):
    # autograd is this op's (register_autograd below): the GEMM targets see plain tensors
    return sas_matmul(x.detach(), weight.detach(), None if bias is None else bias.detach(), M=M, rule=rule)


@sas_linear.register_fake
def _(x, weight, bias, M, rule):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, M, rule = inputs
    ctx.save_for_backward(x, weight)
    ctx.M, ctx.rule = M, rule


def _linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    M, rule = ctx.M, ctx.rule
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = _slot_grad(grad.matmul(weight), x, M, rule, x.dim() - 1)
    if ctx.needs_input_grad[1]:
        wide = project(x, M, -1, rule)
        grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul(wide.reshape(-1, wide.shape[-1]))
    if ctx.needs_input_grad[2]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b, None, None


sas_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# ---------------------------------------------------------------- conv2d


def conv2d_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _conv_memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@torch.library.custom_op("sas::conv2d", mutates_args=())
def sas_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    M: int,
    rule: str,
) -> Tensor:
    """``F.conv2d(S(x), weight, bias, ...)`` with ``S`` along channels; ``weight`` is wide."""
    return _projected_conv2d(x, weight, bias, stride, padding, dilation, groups, M, rule)


@sas_conv2d.register_kernel("cuda")
def _(x, weight, bias, stride, padding, dilation, groups, M, rule):
    return _sas_conv2d_accelerated(x, weight, bias, stride, padding, dilation, groups, M, rule)


@sas_conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, M, rule):
    kh, kw = weight.shape[-2:]
    h = conv2d_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    w = conv2d_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    out = x.new_empty((x.shape[0], weight.shape[0], h, w))
    return out.contiguous(memory_format=_conv_memory_format(x))


def _projected_conv2d(x, weight, bias, stride, padding, dilation, groups, M, rule):
    """The PyTorch formulation: one projection pass, then the dense (cuDNN) conv on S(x)."""
    out = F.conv2d(project(x, M, 1, rule), weight, bias, stride, padding, dilation, groups)
    return out.contiguous(memory_format=_conv_memory_format(x))


# The PyTorch formulation written as plain aten ops (what a lowering pass puts in a graph so
# that the compiler fuses the projection with its neighbours); padding as F.conv* take it.
def projected_linear(x, weight, bias, M: int, rule: str):
    """``F.linear(S(x), weight, bias)`` with the projection as out-of-place ops."""
    return F.linear(project_aten(x, M, -1, rule), weight, bias)


def projected_conv2d(x, weight, bias, stride, padding, dilation, groups, M: int, rule: str):
    """``F.conv2d(S(x), weight, ...)`` with the projection as out-of-place ops."""
    return F.conv2d(project_aten(x, M, 1, rule), weight, bias, stride, padding, dilation, groups)


def projected_conv1d(x, weight, bias, stride, padding, dilation, groups, M: int, rule: str):
    """``F.conv1d(S(x), weight, ...)`` with the projection as out-of-place ops."""
    return F.conv1d(project_aten(x, M, 1, rule), weight, bias, stride, padding, dilation, groups)


def _sas_conv2d_accelerated(x, weight, bias, stride, padding, dilation, groups, M, rule):
    """A SAS conv on a GPU: projection + cuDNN, unless the unfolded Sparse Tensor Core GEMM
    measures faster for this shape (``runtime/autotune.py``; never a slower path)."""
    return sas_conv2d_choice(x, weight, bias, stride, padding, dilation, groups, M, rule)[1]()


def sas_conv2d_choice(x, weight, bias, stride, padding, dilation, groups, M, rule):
    """``(decision or None, call)`` of a SAS conv on an accelerator: ``call()`` computes it.

    ``None`` when only the PyTorch formulation (projection + dense conv) applies.
    """
    x, weight = x.detach(), weight.detach()
    bias = None if bias is None else bias.detach()
    dense = lambda: _projected_conv2d(x, weight, bias, stride, padding, dilation, groups, M, rule)  # noqa: E731
    if groups != 1 or x.shape[1] % (M.bit_length() - 1) != 0:
        return None, dense  # not one unfolded SAS GEMM
    if select_target("sas::conv2d", "auto", x, weight, bias, M=M, rule=rule).name == "torch":
        return None, dense
    candidates = {
        autotune.REFERENCE: dense,
        "fused_im2col": lambda: _sas_conv2d_unfolded(x, weight, bias, stride, padding, dilation, groups, M, rule,
                                                     target="cuda"),
    }
    batch = x.shape[0]
    fields = {"dtype": str(x.dtype).replace("torch.", ""), "M": M, "x": [max(1, 1 << (batch - 1).bit_length()),
              *x.shape[1:]], "weight": list(weight.shape), "stride": list(stride), "padding": list(padding),
              "dilation": list(dilation), "channels_last": _conv_memory_format(x) == torch.channels_last,
              "bias": bias is not None}
    decision = autotune.choose("sas_conv2d", fields, candidates, x.device)
    return decision, candidates[decision.impl]


def _sas_conv2d_unfolded(x, weight, bias, stride, padding, dilation, groups, M, rule, target="auto"):
    """Accelerator path: unfold (im2col) so the layer is one ``sas_matmul`` on the GEMM targets.

    K is ordered kernel-position-major, channel-minor, so the index rule's channel groups stay
    neighbours in K; the wide weight is permuted to match. Cases this ordering cannot express
    (grouped convs, channel groups straddling kernel positions) use the projected dense conv.
    """
    import logging

    channels = x.shape[1]
    bits = M.bit_length() - 1
    if groups != 1 or channels % bits != 0:
        logging.getLogger("sas_compile.runtime").info(
            "sas::conv2d on %s: groups=%d, channels=%d, M=%d cannot be unfolded into one SAS "
            "GEMM; using the projected dense convolution", x.device, groups, channels, M,
        )
        out = F.conv2d(project(x, M, 1, rule), weight, bias, stride, padding, dilation, groups)
        return out.contiguous(memory_format=_conv_memory_format(x))
    batch, _, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    positions = cols.shape[-1]
    rows = cols.view(batch, channels, kh * kw, positions).permute(0, 3, 2, 1)
    rows = rows.reshape(batch * positions, kh * kw * channels)
    wide = weight.view(out_channels, channels, M, kh * kw).permute(0, 3, 1, 2)
    wide = wide.reshape(out_channels, kh * kw * channels * M)
    out = sas_matmul(rows.detach(), wide.detach(), None if bias is None else bias.detach(), M=M, rule=rule,
                     target=target)
    out_h = conv2d_output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = conv2d_output_size(width, kw, stride[1], padding[1], dilation[1])
    out = out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)
    return out.contiguous(memory_format=_conv_memory_format(x))


def _conv_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, M, rule = inputs
    ctx.save_for_backward(x, weight)
    ctx.conf = (list(stride), list(padding), list(dilation), groups)
    ctx.M, ctx.rule = M, rule
    ctx.bias_sizes = None if bias is None else list(bias.shape)


def _conv_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conf
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    wide = project(x, ctx.M, 1, ctx.rule)
    grad_wide, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad.contiguous(memory_format=_conv_memory_format(wide)),
        wide,
        weight,
        ctx.bias_sizes if need_b else None,
        stride,
        padding,
        dilation,
        False,
        [0, 0],
        groups,
        [need_x, need_w, need_b and ctx.bias_sizes is not None],
    )
    grad_x = _slot_grad(grad_wide, x, ctx.M, ctx.rule, 1) if need_x else None
    return grad_x, grad_w, grad_b, None, None, None, None, None, None


sas_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)

# under torch.autocast, x, weight and bias are cast to the region's dtype, as for aten::linear
_autocast_library = torch.library.Library("sas", "IMPL")
register_autocast_like_linear(torch.ops.sas.linear, (0, 1, 2), _autocast_library)
register_autocast_like_linear(torch.ops.sas.conv2d, (0, 1, 2), _autocast_library)


def resolve_conv_padding(
    padding, kernel_size: Sequence[int], dilation: Sequence[int], stride: Sequence[int]
):
    """Turn ``'same'`` / ``'valid'`` / ints into ``(symmetric [ph, pw], extra F.pad or None)``.

    ``'same'`` with an odd total padding pads one more on the bottom/right, as PyTorch does.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0], None
        if padding != "same":
            raise ValueError(f"padding={padding!r}: expected 'same', 'valid' or integers")
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions (PyTorch rule)")
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        sym = [t // 2 for t in totals]
        extra = [t - 2 * s for t, s in zip(totals, sym)]
        if any(extra):
            # F.pad order: (left, right, top, bottom)
            return sym, (0, extra[1], 0, extra[0])
        return sym, None
    if isinstance(padding, int):
        return [padding, padding], None
    padding = list(padding)
    return padding, None


def sas_conv2d_call(x, weight, bias, stride, padding, dilation, groups, M: int, rule: str):
    """``sas::conv2d`` with the arguments of ``F.conv2d`` (ints or pairs, string padding)."""
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    stride, dilation = pair(stride), pair(dilation)
    padding, extra = resolve_conv_padding(padding, weight.shape[-2:], dilation, stride)
    if extra is not None:
        x = F.pad(x, extra)
    return torch.ops.sas.conv2d(x, weight, bias, stride, padding, dilation, groups, M, rule)


def sas_conv1d_call(x, weight, bias, stride, padding, dilation, groups, M: int, rule: str):
    """A 1-D SAS convolution as a 2-D one of height 1 (same projection, same weights)."""
    first = lambda v: v if isinstance(v, (int, str)) else v[0]  # noqa: E731
    pad = first(padding)
    pad2 = pad if isinstance(pad, str) else (0, pad)
    out = sas_conv2d_call(
        x.unsqueeze(2), weight.unsqueeze(2), bias, (1, first(stride)), pad2, (1, first(dilation)),
        groups, M, rule,
    )
    return out.squeeze(2)
