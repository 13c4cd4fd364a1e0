"""``sas::conv_transpose``: a SAS transposed convolution (1-, 2- or 3-D).

A transposed convolution is linear in its input's channels as a convolution is: its weight is
stored ``[in, out/groups, *kernel]``, so SAS widens dim 0 M times and feeds it ``S(x)``,
projected along the channel dim: ``conv_transpose(S(x), Wt)`` with ``Wt[c*M + m] = s_c(m) W[c]``
(``projection.expand_transposed_weight``) is ``conv_transpose(x, W)``. The multiplies per input
position are the narrow layer's, one of every M slots being nonzero; the parameters grow M times.

As ``sas::conv2d``: the CPU writes the projection into the reused workspace and calls the dense
kernel on it (``aten.convolution`` with ``transposed=True``); the backward recomputes the
projection from the saved narrow input and runs one ``convolution_backward`` for the input,
weight and bias gradients, folding the wide input gradient to the narrow one. On a GPU the same
code runs on cuDNN (no Sparse Tensor Core kernel computes a transposed convolution here).
``sas::conv_transpose_from_dense`` is the backend's form, on the dense weight expanded once per
weight version. Under ``torch.func`` transforms, forward-mode AD and ``create_graph=True`` the
layer runs as :func:`projected_conv_transpose`, plain differentiable ops.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .autocast import register_autocast_like_linear
from .projection import (
    dead_rows,
    expand_transposed_weight,
    fold_transposed_grad,
    owned,
    project_aten,
    project_transient,
    zero_rows,
)
from .sas_ops import (
    batch_of_one,
    composite_transform_active,
    differentiable_grads,
    from_dense_conv_backward,
    save_conv_context,
    slot_grad,
    unbatched_like,
    wide_weight,
    zero_dead_nonfinite,
)

__all__ = ["sas_conv_transpose", "sas_conv_transpose_from_dense", "sas_conv_transpose_call",
           "projected_conv_transpose", "dense_conv_transpose_through", "transposed_output_size"]


def transposed_output_size(size: int, kernel: int, stride: int, padding: int, output_padding: int,
                           dilation: int) -> int:
    """Output length of one dim of a transposed convolution (PyTorch's formula)."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _conv_transpose(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, output_padding, dilation,
                    groups: int) -> Tensor:
    return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, True, output_padding, groups)


def projected_conv_transpose(x, weight, bias, stride, padding, output_padding, dilation, groups, M: int, rule: str):
    """``sas::conv_transpose`` in plain out-of-place ops: its values and derivatives (the composite
    form, and what the GPU lowering writes into compiled graphs)."""
    wide_x = zero_dead_nonfinite(project_aten(x, M, 1, rule), zero_rows(weight.detach()), 1)
    return _conv_transpose(wide_x, weight, bias, stride, padding, output_padding, dilation, groups)


def dense_conv_transpose_through(x, weight, bias, stride, padding, output_padding, dilation, groups, M: int,
                                 fold_relu: bool, rule: str, train_dense: bool):
    """What ``sas::conv_transpose_from_dense`` computes, as the dense transposed convolution."""
    return _conv_transpose(torch.relu(x) if fold_relu else x, weight, bias, stride, padding, output_padding,
                           dilation, groups)


def _forward(x, wide, bias, stride, padding, output_padding, dilation, groups, M, rule):
    """One projection pass into the workspace, then the dense transposed convolution on it."""
    wide_x = project_transient(x, M, 1, rule, dead_rows(wide))
    return owned(_conv_transpose(wide_x, wide, bias, stride, padding, output_padding, dilation, groups))


def _fake(x, weight, stride, padding, output_padding, dilation, groups):
    """An empty output: ``weight.shape[1] * groups`` channels, each spatial dim by PyTorch's formula."""
    kernel = weight.shape[2:]
    sizes = [transposed_output_size(x.shape[2 + i], kernel[i], stride[i], padding[i], output_padding[i],
                                    dilation[i]) for i in range(len(kernel))]
    return x.new_empty((x.shape[0], weight.shape[1] * groups, *sizes))


def _grads(grad, x, wide, bias_sizes, conf, M, rule, need_x, need_w, need_b):
    """``(grad_x, grad of the wide weight, grad_bias)``: one ``convolution_backward`` on the
    recomputed projection, the wide input gradient folded to the narrow one."""
    stride, padding, output_padding, dilation, groups = conf
    # dead slots in eager mode only: a traced backward (fake tensors under torch.compile) reads no data
    eager = type(x) is torch.Tensor and type(wide) in (torch.Tensor, torch.nn.Parameter)
    wide_x = project_transient(x, M, 1, rule, dead_rows(wide) if eager else None)
    grad_wide, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad.contiguous(), wide_x, wide, bias_sizes if need_b else None, stride, padding, dilation, True,
        output_padding, groups, [need_x, need_w, need_b])
    grad_x = slot_grad(grad_wide, x, M, rule, 1) if need_x else None
    return grad_x, grad_w, grad_b


# ---------------------------------------------------------------- on the wide weight


@torch.library.custom_op("sas::conv_transpose", mutates_args=())
def sas_conv_transpose(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
                       output_padding: List[int], dilation: List[int], groups: int, M: int, rule: str) -> Tensor:
    """``conv_transpose(S(x), weight, bias, ...)`` with ``S`` along channels; ``weight`` is the wide
    ``[M * in, out/groups, *kernel]``; ``x`` is batched (``[N, in, *spatial]``)."""
    return _forward(x, weight, bias, stride, padding, output_padding, dilation, groups, M, rule)


@sas_conv_transpose.register_fake
def _(x, weight, bias, stride, padding, output_padding, dilation, groups, M, rule):
    return _fake(x, weight, stride, padding, output_padding, dilation, groups)


def _conf(stride, padding, output_padding, dilation, groups) -> tuple:
    return list(stride), list(padding), list(output_padding), list(dilation), groups


def _setup(ctx, inputs, output):
    x, weight, bias, stride, padding, output_padding, dilation, groups, M, rule = inputs
    save_conv_context(ctx, x, weight, bias, _conf(stride, padding, output_padding, dilation, groups), M)
    ctx.M, ctx.rule = M, rule


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    none = (None,) * 7
    if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
        grad_x, grad_w = differentiable_grads(
            lambda xx, ww: projected_conv_transpose(xx, ww, None, *ctx.conf[:4], ctx.conf[4], ctx.M, ctx.rule),
            x, weight, grad, need_x, need_w)
        grad_b = grad.sum([0, *range(2, grad.dim())]) if need_b and ctx.bias_sizes is not None else None
        return (grad_x, grad_w, grad_b) + none
    grad_x, grad_w, grad_b = _grads(grad, x, weight, ctx.bias_sizes, ctx.conf, ctx.M, ctx.rule, need_x, need_w,
                                    need_b and ctx.bias_sizes is not None)
    return (grad_x, grad_w, grad_b) + none


sas_conv_transpose.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------- from a dense weight

@torch.library.custom_op("sas::conv_transpose_from_dense", mutates_args=())
def sas_conv_transpose_from_dense(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                                  padding: List[int], output_padding: List[int], dilation: List[int], groups: int,
                                  M: int, fold_relu: bool, rule: str, train_dense: bool) -> Tensor:
    """``sas::conv_transpose`` with the wide weight expanded (and cached) from the dense ``weight``."""
    wide = wide_weight(weight, M, fold_relu, rule, transposed=True)  # cached per weight version
    return _forward(x, wide, bias, stride, padding, output_padding, dilation, groups, M, rule)


@sas_conv_transpose_from_dense.register_fake
def _(x, weight, bias, stride, padding, output_padding, dilation, groups, M, fold_relu, rule, train_dense):
    return _fake(x, weight, stride, padding, output_padding, dilation, groups)


def _from_dense_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, output_padding, dilation, groups, M, fold_relu, rule, train_dense = inputs
    save_conv_context(ctx, x, weight, bias, _conf(stride, padding, output_padding, dilation, groups), M)
    ctx.sas = (M, fold_relu, rule, train_dense)


def _from_dense_backward(ctx, grad):
    return from_dense_conv_backward(ctx, grad, expand_transposed_weight, fold_transposed_grad, _grads) + (None,) * 9


sas_conv_transpose_from_dense.register_autograd(_from_dense_backward, setup_context=_from_dense_setup)


# ---------------------------------------------------------------- the Python entry point


def sas_conv_transpose_call(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                            padding: List[int], output_padding: List[int], dilation: List[int], groups: int, M: int,
                            rule: str) -> Tensor:
    """``sas::conv_transpose`` on a batched or unbatched input, or its composite form where a
    transform needs it (``torch.func``, forward AD). TorchScript compiles the op call alone."""
    batched = batch_of_one(x, weight, True)
    if not torch.jit.is_scripting():
        if composite_transform_active():
            out = projected_conv_transpose(batched, weight, bias, stride, padding, output_padding, dilation, groups,
                                           M, rule)
            return unbatched_like(out, x, weight, True)
    out = torch.ops.sas.conv_transpose(batched, weight, bias, stride, padding, output_padding, dilation, groups, M,
                                       rule)
    return unbatched_like(out, x, weight, True)


# under torch.autocast, x, weight and bias are cast to the region's dtype, as for aten::linear
_autocast_library = torch.library.Library("sas", "IMPL")
register_autocast_like_linear(torch.ops.sas.conv_transpose, (0, 1, 2), _autocast_library)
register_autocast_like_linear(torch.ops.sas.conv_transpose_from_dense, (0, 1, 2), _autocast_library)
