"""The ``sas::`` torch ops: a SAS layer computes ``Wt S(x)`` from the narrow ``x``.

Why ops and not plain Python: dynamo, AOT autograd and inductor see one opaque call per
layer (with a fake implementation for tracing and an autograd formula), and the runtime
can pick a target per device behind it. The CPU implementation writes the projected
activation into a reused workspace (``projection.project_transient``; one pass by the host
kernels for the sign rule at any M), never a zero-filled tensor plus scatter, and calls the dense kernel on it;
the backward recomputes the projection from the saved narrow input, so autograd holds only the
narrow activation.
"""
from __future__ import annotations

import functools
import math
import os
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from . import autotune, host_kernels
from .autocast import register_autocast_like_linear
from .matmul import sas_matmul, select_target
from .projection import (
    is_builtin_sign_rule,
    is_builtin_sign_rule_m2,
    PerWeightCache,
    owned,
    SignPatternRule,
    dead_slots,
    zero_columns,
    expand_dense_weight,
    expand_transposed_weight,
    fold_wide_grad,
    get_rule,
    project_aten,
    project_transient,
    shrink_workspace,
)

__all__ = ["sas_linear", "sas_conv2d", "sas_linear_from_dense", "sas_conv2d_from_dense", "conv2d_output_size",
           "sas_conv2d_choice", "projected_linear", "projected_conv2d", "dense_linear_through",
           "dense_conv2d_through", "wide_weight", "sas_linear_call", "sas_conv2d_call", "sas_conv1d_call",
           "composite_transform_active",
           "clear_wide_weight_cache", "SASTrainingError"]


def _backward_dead_mask(x: Tensor, weight: Tensor, groups: int = 1) -> Optional[Tensor]:
    """The dead slots for a backward's projection, in eager mode only: a traced backward
    (fake or functional tensors under torch.compile) cannot read data, and keeps the plain form."""
    if type(x) is not torch.Tensor or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return None
    return dead_slots(weight, groups)


def _fit_workspace_to_training(x: Tensor, M: int) -> None:
    """Called by the ops' ``setup_context``, which runs only when autograd records the op.

    A training step's peak memory is at the end of its forward, where the activations have
    accumulated. The projection workspace is sized to the largest projection seen; here a
    recorded layer whose projection needs under a quarter of it frees it, so as a network
    narrows (a CNN's stages) the workspace shrinks with it and the forward ends holding no
    more than a few of its last layers' wide tensors. Layers of one size, and a transformer's
    blocks (its largest projection, fc2's, is 4x the others), keep the workspace: a fresh
    block per layer cost page faults (a 12 MB projection measured 1.5x the dense-wide layer's
    forward+backward with them, 1.1x without). The backward's recomputed projections grow it
    again; inference keeps it at its largest between calls. Eager tensors only: a traced
    forward (fake tensors under torch.compile) has no workspace and no shapes to guard on."""
    if type(x) is torch.Tensor:
        shrink_workspace(x.numel() * M, x.dtype)


def _slot_grad_host(grad_wide: Tensor, x: Tensor, dim: int, M: int) -> Optional[Tensor]:
    """:func:`slot_grad` of the sign-pattern rule by the host kernels (``runtime/host_kernels.py``);
    a channels_last convolution is read as NHWC; None where the kernels do not apply."""
    if dim == 1 and x.dim() == 4 and _conv_memory_format(x) == torch.channels_last:
        if _conv_memory_format(grad_wide) != torch.channels_last:
            return None
        nhwc = host_kernels.slot_grad_sign(grad_wide.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1), -1, M)
        return None if nhwc is None else nhwc.permute(0, 3, 1, 2)
    return host_kernels.slot_grad_sign(grad_wide, x, dim, M)


def slot_grad(grad_wide: Tensor, x: Tensor, M: int, rule: str, dim: int) -> Tensor:
    """d/dx of S(x): the wide gradient at each value's slot, times d|x|/dx.

    The slot holds ``|x|``: its derivative is +1 for ``x > 0`` and -1 otherwise, the derivative
    from the left at ``x = 0`` (the side the rule files 0 under: ``x <= 0`` is nonpositive). For
    a function-preserving conversion that is the dense layer's own gradient at 0.

    Written with ``threshold_backward`` (``g`` where ``x > 0``, else 0: relu's backward, one
    vectorised pass) and exact subtractions (one side is always 0): ``torch.where`` and
    bool-mask products are 3-4x slower on the CPU. ``grad_wide`` is the caller's fresh product
    and is overwritten.
    """
    threshold_backward = torch.ops.aten.threshold_backward
    per_slot = grad_wide.unflatten(dim, (x.shape[dim], M))
    index_rule = get_rule(rule, M)
    if is_builtin_sign_rule(index_rule):
        done = _slot_grad_host(grad_wide, x, dim, M)
        if done is not None:
            return done
    if is_builtin_sign_rule_m2(index_rule):
        positive, negative = per_slot.select(dim + 1, 0), per_slot.select(dim + 1, 1)
        # one narrow tensor beside the wide gradient: the result, first holding negative where
        # x <= 0 (negative minus its part where x > 0); the positive plane is thresholded in place
        result = threshold_backward(negative, x, 0)
        torch.sub(negative, result, out=result)
        threshold_backward_into = torch.ops.aten.threshold_backward.grad_input
        return torch.sub(threshold_backward_into(positive, x, 0, grad_input=positive), result, out=result)
    slot = index_rule.slot(x, dim).to(torch.int64).unsqueeze(dim + 1)
    grad = per_slot.gather(dim + 1, slot).squeeze(dim + 1)
    # grad where x > 0, -grad elsewhere: kept - (grad - kept), kept = grad where x > 0
    kept = threshold_backward(grad, x, 0)
    return kept.sub_(grad.sub_(kept))


# ---------------------------------------------------------------- the composite form
#
# The ops' own autograd (register_autograd below) serves ``backward()``: training. Three uses it
# cannot serve, each of which went wrong quietly before: a ``torch.func`` transform (grad, vjp,
# jacrev, vmap of grad: torch.library's autograd Function has no functorch support, an error),
# forward-mode AD (``torch.func.jvp``, ``forward_ad``: a custom op has no forward derivative, and
# the tangent came out as zeros) and a backward that records its own graph
# (``create_graph=True``: gradient penalties, Hessian-vector products; the host kernels'
# gradients are constants to autograd, so second derivatives came out missing). There the layer
# runs as ``projected_linear`` / ``projected_conv2d``: the op's values in plain differentiable ops
# whose derivative is the op's own, the derivative from the left at x = 0 included (the same
# form the GPU lowering writes into compiled graphs).


def composite_transform_active() -> bool:
    """Whether a transform the ops' autograd cannot serve is active: a ``torch.func`` transform
    or a forward-mode AD level (never while dynamo or export traces: they record the op)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.peek_interpreter_stack() is not None or getattr(forward_ad, "_current_level", -1) >= 0


def zero_dead_nonfinite(wide_x: Tensor, dead: Tensor, dim: int) -> Tensor:
    """A slot whose weights are all zero (``dead``, one entry per wide index along ``dim``: a
    weight's :func:`zero_columns`, a transposed one's ``zero_rows``) reads 0 where its value is not
    finite (the ops' dead slots: never ``0 * inf`` = NaN); elementwise, so it batches under
    ``vmap``, and finite values stay, so such a slot's weight gradient is the ops' own."""
    shape = [1] * wide_x.dim()
    shape[dim] = dead.shape[0]
    return torch.where(dead.view(shape) & ~torch.isfinite(wide_x), torch.zeros((), dtype=wide_x.dtype,
                                                                               device=wide_x.device), wide_x)


def projected_linear(x, weight, bias, M: int, rule: str):
    """``sas::linear`` in plain out-of-place ops: its values and derivatives (see *the composite
    form*); also what the GPU lowering writes into compiled graphs."""
    return F.linear(zero_dead_nonfinite(project_aten(x, M, -1, rule), zero_columns(weight.detach()), -1), weight,
                    bias)


def projected_conv2d(x, weight, bias, stride, padding, dilation, groups, M: int, rule: str):
    """``sas::conv2d`` in plain out-of-place ops (padding as ``F.conv2d`` takes it); as
    :func:`projected_linear`."""
    kernel = _kernel_2d(weight)
    wide_x = zero_dead_nonfinite(project_aten(x, M, 1, rule), zero_columns(kernel.detach(), groups), 1)
    return _conv_nd(wide_x, kernel, bias, stride, padding, dilation, groups)


def differentiable_grads(composite, x: Tensor, weight: Tensor, grad: Tensor, need_x: bool, need_w: bool):
    """``(grad_x, grad_w)`` of ``composite(x, weight)`` against ``grad``, as a graph autograd can
    differentiate again: a backward under ``create_graph=True``."""
    targets = [t for t, need in ((x, need_x), (weight, need_w)) if need]
    if not targets:
        return None, None
    with torch.enable_grad():
        got = list(torch.autograd.grad(composite(x, weight), targets, grad, create_graph=True))
    return (got.pop(0) if need_x else None), (got.pop(0) if need_w else None)


# ---------------------------------------------------------------- linear


@torch.library.custom_op("sas::linear", mutates_args=())
def sas_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, rule: str) -> Tensor:
    """``F.linear(S(x), weight, bias)``; ``x`` is narrow ``(..., K)``, ``weight`` is ``(N, M*K)``."""
    return owned(F.linear(project_transient(x, M, -1, rule, dead_slots(weight)), weight, bias))


@sas_linear.register_kernel("cuda")
def _(x, weight, bias, M, rule):
    # autograd is this op's (register_autograd below); the tensors go as they are (not
    # detached copies: the per-weight caches key on the tensor itself)
    with torch.no_grad():
        return owned(sas_matmul(x, weight, bias, M=M, rule=rule))


@sas_linear.register_fake
def _(x, weight, bias, M, rule):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, M, rule = inputs
    _fit_workspace_to_training(x, M)
    ctx.save_for_backward(x, weight)
    ctx.M, ctx.rule = M, rule


def _linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    M, rule = ctx.M, ctx.rule
    grad_x = grad_w = grad_b = None
    if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
        grad_x, grad_w = differentiable_grads(lambda xx, ww: projected_linear(xx, ww, None, M, rule), x, weight, grad,
                                               *ctx.needs_input_grad[:2])
        if ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None, None
    if ctx.needs_input_grad[0]:
        grad_x = slot_grad(grad.matmul(weight), x, M, rule, x.dim() - 1)
    if ctx.needs_input_grad[1]:
        wide = project_transient(x, M, -1, rule, _backward_dead_mask(x, weight))
        grad_w = grad.reshape(-1, grad.shape[-1]).t().matmul(wide.reshape(-1, wide.shape[-1]))
    if ctx.needs_input_grad[2]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b, None, None


sas_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# ---------------------------------------------------------------- conv2d


def conv2d_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _kernel_2d(weight: Tensor) -> Tensor:
    """A conv weight as the convolution takes it: a conv1d weight ``(out, in, k)`` is the kernel
    ``(out, in, 1, k)``; a conv2d or conv3d weight is its own kernel.

    The conv ops take a conv1d layer's weight itself (3-D, beside an input of height 1) and make
    this view only after their per-weight cache lookups (expansion, dead slots, unfolded
    weight): a view is a new tensor on every call, and those caches key on the tensor itself.
    """
    return weight.unsqueeze(2) if weight.dim() == 3 else weight


def _conv_nd(x: Tensor, kernel: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int) -> Tensor:
    """``F.conv2d``, or ``F.conv3d`` for a 5-D kernel (a conv3d layer's)."""
    return (F.conv3d if kernel.dim() == 5 else F.conv2d)(x, kernel, bias, stride, padding, dilation, groups)


def _strided_positions(strides) -> tuple:
    """The index that reads every stride-th position of each spatial dim of an ``[N, C, ...]`` tensor."""
    return (slice(None), slice(None), *(slice(None, None, step) for step in strides))


def _conv_output(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
    """An empty output of the convolution (the ops' fake implementations)."""
    kernel = _kernel_2d(weight).shape[2:]
    sizes = [conv2d_output_size(x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i])
             for i in range(len(kernel))]
    out = x.new_empty((x.shape[0], weight.shape[0], *sizes))
    return out.contiguous(memory_format=_conv_memory_format(x))


def _conv_memory_format(x: Tensor) -> torch.memory_format:
    """The layout a convolution gives for ``x``: channels_last (4-D) or channels_last_3d (5-D)
    when ``x`` is in it, as ``F.conv2d``/``F.conv3d`` do; contiguous otherwise."""
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if last is not None and not x.is_contiguous() and x.is_contiguous(memory_format=last):
        return last
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
    """``F.conv2d(S(x), weight, bias, ...)`` with ``S`` along channels; ``weight`` is wide.

    A 3-D ``weight`` is a conv1d weight, the kernel of height 1 (``x`` then has height 1); a 5-D
    ``weight`` (with a 5-D ``x`` and three-entry lists) makes it ``F.conv3d``.
    """
    return _projected_conv2d(x, weight, bias, stride, padding, dilation, groups, M, rule)


@sas_conv2d.register_kernel("cuda")
def _(x, weight, bias, stride, padding, dilation, groups, M, rule):
    return _sas_conv2d_accelerated(x, weight, bias, stride, padding, dilation, groups, M, rule)


@sas_conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, M, rule):
    return _conv_output(x, weight, stride, padding, dilation)


def _pointwise_subsample(x: Tensor, weight: Tensor, stride, padding):
    """``(input to project, stride)``: a 1x1 convolution without padding reads only every
    stride-th position, and ``S`` is elementwise, so a strided one (ResNet's downsample layers)
    projects only those positions and convolves them with stride 1: 1/4 of the projection at
    stride 2, and no copy of the wide input inside ``convolution_backward``, which makes one for
    strided 1x1 kernels (a 4x-wide one at M = 4 was the peak of a ResNet-50 training step).
    ``(x, stride)`` otherwise."""
    kernel = _kernel_2d(weight).shape[2:]
    if all(k == 1 for k in kernel) and not any(padding) and any(step != 1 for step in stride):
        sub = x[_strided_positions(stride)]
        return sub.contiguous(memory_format=_conv_memory_format(x)), [1] * len(stride)
    return x, stride


def _projected_conv2d(x, weight, bias, stride, padding, dilation, groups, M, rule):
    """The PyTorch formulation: one projection pass, then the dense (cuDNN) conv on S(x)."""
    x_read, stride = _pointwise_subsample(x, weight, stride, padding)
    wide_x = project_transient(x_read, M, 1, rule, dead_slots(weight, groups))
    packed = _packed_cpu_weight(wide_x, weight, stride, padding, dilation, groups)
    out, failure = None, None
    if packed is not None:
        try:
            out = _packed_conv2d(wide_x, packed, bias, stride, padding, dilation, groups)
        except (RuntimeError, TypeError, AttributeError) as exc:
            failure = exc
    if out is None:
        # after a failed packed call this raises the caller's own error if the inputs are wrong:
        # only where it succeeds was the packed path at fault
        out = _conv_nd(wide_x, _kernel_2d(weight), bias, stride, padding, dilation, groups)
        if failure is not None:
            _stop_packing(failure)
    return owned(out.contiguous(memory_format=_conv_memory_format(x)))


# ---------------------------------------------------------------- CPU inference: packed weights
#
# oneDNN reorders a plain conv weight into its blocked layout on every call. A SAS weight is M
# times the dense one, and where it outweighs the layer's input (deep layers, small batches) the
# reorder is most of the layer: on [1, 2048, 4, 4] x [512, 2048, 3, 3] (ResNet's last stage at
# M = 4, batch 1) oneDNN's log shows 12 ms of weight reorder against 3.4 ms of convolution, and
# a wide weight above 32 MB is a fresh glibc mapping, page-faulted in on each call. Under
# torch.inference_mode no weight can change behind a cached copy's back unseen (the version
# counter is checked on every call) and autograd records nothing, so there the weight is packed
# once per version, as inductor's freezing does for dense models.

ENV_CPU_PACK = "SAS_COMPILE_CPU_PACK"
# weights below this many values stay plain: the packed op's fixed cost (it takes the input as
# channels_last) is larger than a small weight's reorder; at batch 1 on 4x4 images the packed
# call measured 121-182 us against 55-138 us plain up to 147,456 values, and faster from 294,912
PACK_MIN_WEIGHT_VALUES = 1 << 18
_packed_cache = PerWeightCache()
_packing = {"failed": None}  # the first failure of oneDNN's private packing ops turns packing off


def _stop_packing(exc: BaseException) -> None:
    """The packed ops are PyTorch internals (inductor's): where they fail, as another PyTorch
    version may, the plain convolution runs from then on, and the reason is logged once."""
    if _packing["failed"] is None:
        _packing["failed"] = f"{type(exc).__name__}: {exc}"
        import logging
        logging.getLogger("sas_compile.runtime").warning(
            "oneDNN weight packing failed (%s); SAS convolutions under inference_mode use the plain "
            "convolution from now on (same values, slower on weight-heavy layers)", _packing["failed"])
    _packed_cache.clear()


def _packed_conv2d(wide_x: Tensor, packed: Tensor, bias: Optional[Tensor], stride, padding, dilation,
                   groups: int) -> Tensor:
    """``F.conv2d`` on a weight packed by ``mkldnn_reorder_conv2d_weight`` (no activation fused)."""
    return torch.ops.mkldnn._convolution_pointwise(wide_x, packed, bias, list(padding), list(stride), list(dilation),
                                                   groups, "none", [], "")


def _check_packed(packed: Tensor, kernel: Tensor, wide_x: Tensor, stride, padding, dilation, groups: int) -> None:
    """Once per pack, on the call's own input: the packed convolution against ``F.conv2d``, as the
    GPU autotuner checks every candidate against the PyTorch formulation. The packed ops are
    PyTorch internals whose arguments another version may read differently (a swapped stride
    and padding would still run); a disagreement raises, and packing stops (``_stop_packing``)."""
    got = _packed_conv2d(wide_x, packed, None, stride, padding, dilation, groups)
    want = F.conv2d(wide_x, kernel, None, stride, padding, dilation, groups)
    scale = float(want.abs().nan_to_num(0.0, 0.0, 0.0).max()) if want.numel() else 0.0
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * max(scale, 1.0),
                                                     equal_nan=True):
        difference = (got - want).abs().nan_to_num(0.0).max().item() if got.shape == want.shape else "shape"
        raise RuntimeError(f"the packed convolution disagrees with F.conv2d on a weight of shape "
                           f"{tuple(kernel.shape)} (largest difference {difference}, output scale {scale:.3g})")


def _packed_cpu_weight(wide_x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> Optional[Tensor]:
    """The oneDNN-packed form of ``weight`` for a CPU convolution on ``wide_x``, or None where the
    plain convolution runs: outside ``torch.inference_mode``, other than float32, traced (fake)
    tensors, a weight that is itself an inference tensor (it has no version counter to cache
    against), without oneDNN, with ``SAS_COMPILE_CPU_PACK=0``, after the packing ops failed once
    (:func:`_stop_packing`), where the weight has fewer values than the wide input (then the
    reorder is a small part of the layer, and the packed kernel measured 4-16% slower on
    ResNet-50's 56x56 and 14x14 layer shapes at batch 8), and below ``PACK_MIN_WEIGHT_VALUES``.

    Cached per weight version and convolution (``PerWeightCache``: it dies with the weight),
    packed for the first input's size: one copy per weight however many batch or image sizes
    it meets (a pack per size would grow without bound on variable-size inputs); a size the
    packed layout does not suit is still computed exactly (oneDNN then reorders the packed
    weight itself). The packed copy is held beside the weight: the extra memory is the packed
    layers' weights, once."""
    if not torch.is_inference_mode_enabled():
        if _packed_cache.holds_values() and type(weight) is torch.nn.Parameter and weight.requires_grad:
            # a forward outside inference mode of a trainable weight (a training step, eager or
            # compiled): its pack, if an inference_mode pass (validation) made one, is stale from
            # the next optimizer step on, so it goes now rather than being held through training
            _packed_cache.forget(weight)
        return None
    if not (wide_x.is_cpu and wide_x.dtype == torch.float32 and wide_x.dim() == 4
            and type(wide_x) is torch.Tensor and type(weight) in (torch.Tensor, torch.nn.Parameter)
            and weight.dtype == torch.float32 and weight.numel() >= max(wide_x.numel(), PACK_MIN_WEIGHT_VALUES)
            and not weight.is_inference()
            and os.environ.get(ENV_CPU_PACK, "1") != "0" and _packing["failed"] is None
            and torch.backends.mkldnn.is_available()):
        return None
    kernel = _kernel_2d(weight)
    conf = (list(stride), list(padding), list(dilation), groups)

    def make():
        plain = kernel.detach().contiguous()
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(plain.to_mkldnn(), conf[1], conf[0], conf[2], groups,
                                                           list(wide_x.shape))
        _check_packed(packed, plain, wide_x, *conf)
        return packed

    try:
        return _packed_cache.get(weight, ("mkldnn", repr(conf)), make)
    except (RuntimeError, TypeError, AttributeError) as exc:
        _stop_packing(exc)
        return None


def _sas_conv2d_accelerated(x, weight, bias, stride, padding, dilation, groups, M, rule):
    """A SAS conv on a GPU: projection + cuDNN, unless the unfolded Sparse Tensor Core GEMM
    measures faster for this shape (``runtime/autotune.py``; never a slower path)."""
    with torch.no_grad():  # autograd is the op's
        return owned(sas_conv2d_choice(x, weight, bias, stride, padding, dilation, groups, M, rule)[1]())


def sas_conv2d_choice(x, weight, bias, stride, padding, dilation, groups, M, rule):
    """``(decision or None, call)`` of a SAS conv on an accelerator: ``call()`` computes it.

    ``None`` when only the PyTorch formulation (projection + dense conv) applies.
    """
    dense = lambda: _projected_conv2d(x, weight, bias, stride, padding, dilation, groups, M, rule)  # noqa: E731
    if not _unfoldable(x, groups, M, rule):
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
              *x.shape[1:]], "weight": list(_kernel_2d(weight).shape), "stride": list(stride),
              "padding": list(padding), "dilation": list(dilation),
              "channels_last": _conv_memory_format(x) == torch.channels_last, "bias": bias is not None}
    decision = autotune.choose("sas_conv2d", fields, candidates, x.device)
    return decision, candidates[decision.impl]


def _unfoldable(x: Tensor, groups: int, M: int, rule: str) -> bool:
    """Whether the conv is one SAS GEMM over im2col rows: K is ordered kernel position, then
    channel, so the sign pattern's channel groups must not straddle kernel positions."""
    index_rule = get_rule(rule, M)
    return (groups == 1 and x.dim() == 4 and isinstance(index_rule, SignPatternRule)
            and x.shape[1] % index_rule.bits == 0)


_unfolded_cache = PerWeightCache()


def _unfolded_weight(weight: Tensor, M: int) -> Tensor:
    """A wide conv weight (4-D, or a conv1d's 3-D) in the unfolded GEMM's K order (kernel
    position, channel, slot); cached per weight version, so the GEMM's own per-weight caches
    see one tensor."""
    def make():
        out_channels, wide_in = weight.shape[:2]
        taps = math.prod(weight.shape[2:])
        permuted = weight.detach().view(out_channels, wide_in // M, M, taps).permute(0, 3, 1, 2)
        return permuted.reshape(out_channels, taps * wide_in)

    return _unfolded_cache.get(weight, ("unfolded", M), make)


def _sas_conv2d_unfolded(x, weight, bias, stride, padding, dilation, groups, M, rule, target="auto"):
    """Accelerator path: unfold (im2col) so the layer is one ``sas_matmul`` on the GEMM targets.

    K is ordered kernel-position-major, channel-minor, so the index rule's channel groups stay
    neighbours in K; the wide weight is permuted to match. Cases this ordering cannot express
    (grouped convs, channel groups straddling kernel positions) use the projected dense conv.
    """
    import logging

    channels = x.shape[1]
    if not _unfoldable(x, groups, M, rule):
        logging.getLogger("sas_compile.runtime").info(
            "sas::conv2d on %s: groups=%d, channels=%d, M=%d cannot be unfolded into one SAS "
            "GEMM; using the projected dense convolution", x.device, groups, channels, M,
        )
        return _projected_conv2d(x, weight, bias, stride, padding, dilation, groups, M, rule)
    batch, _, height, width = x.shape
    out_channels, _, kh, kw = _kernel_2d(weight).shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    positions = cols.shape[-1]
    rows = cols.view(batch, channels, kh * kw, positions).permute(0, 3, 2, 1)
    rows = rows.reshape(batch * positions, kh * kw * channels)
    out = sas_matmul(rows, _unfolded_weight(weight, M), bias, M=M, rule=rule, target=target)
    out_h = conv2d_output_size(height, kh, stride[0], padding[0], dilation[0])
    out_w = conv2d_output_size(width, kw, stride[1], padding[1], dilation[1])
    out = out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)
    return owned(out.contiguous(memory_format=_conv_memory_format(x)))


def save_conv_context(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], conf: tuple, M: int) -> None:
    """What a convolution op's ``setup_context`` keeps (every conv op's, transposed or from a dense
    weight): the narrow input and the weight, the op's geometry ``conf``, the bias's size; and
    the workspace fitted to a training forward."""
    _fit_workspace_to_training(x, M)
    ctx.save_for_backward(x, weight)
    ctx.conf = conf
    ctx.bias_sizes = None if bias is None else list(bias.shape)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, M, rule = inputs
    save_conv_context(ctx, x, weight, bias, (list(stride), list(padding), list(dilation), groups), M)
    ctx.M, ctx.rule = M, rule


BACKWARD_CHUNK_BYTES = 16 << 20  # a CPU backward whose wide input is larger runs in batch chunks


def _projected_conv_grads(grad, x, wide_weight, bias_sizes, conf, M, rule, need_x, need_w, need_b):
    """``(grad_x, grad of the wide weight, grad_bias)`` of ``conv2d(S(x), wide_weight, ...)``.

    One ``convolution_backward`` on the recomputed projection for all three: oneDNN shares its
    reorders between the input and weight gradients (two separate calls measured 1.3-1.5x one).
    The wide input gradient is folded to the narrow one (:func:`slot_grad`) and freed. On the
    CPU a wide input above ``BACKWARD_CHUNK_BYTES`` is recomputed and used a batch chunk at a
    time (the weight and bias gradients summed over the chunks): the recomputed projection and
    the wide input gradient, each M times the layer's input, are the largest transients of a
    training step (at M = 4 they set ResNet-50's peak). Chunks also measured faster here: a block
    above 32 MB is a fresh mapping with page faults on every allocation (on [4, 256, 56, 56] at
    M = 4, 46-51 ms against 90 ms in one call).
    """
    stride, padding, dilation, groups = conf
    need_b = need_b and bias_sizes is not None
    x_read, read_stride = _pointwise_subsample(x, wide_weight, stride, padding)
    grad = grad.contiguous(memory_format=_conv_memory_format(x_read))
    batch = x_read.shape[0]
    chunks = 1
    if x_read.device.type == "cpu" and type(x_read) is torch.Tensor and batch > 1:  # eager only: a traced
        # backward (fake tensors under torch.compile) keeps one call, without shape-dependent loops
        chunks = min(batch, -(-x_read.numel() * M * x_read.element_size() // BACKWARD_CHUNK_BYTES))
    step = max(1, -(-batch // chunks))
    grad_x_parts, grad_w, grad_b = [], None, None
    for start in range(0, max(batch, 1), step):  # an empty batch still runs once (zero weight gradient)
        xs, gs = x_read[start:start + step], grad[start:start + step]
        wide = project_transient(xs, M, 1, rule, _backward_dead_mask(xs, wide_weight, groups))
        grad_wide, part_w, part_b = torch.ops.aten.convolution_backward(
            gs, wide, _kernel_2d(wide_weight), bias_sizes if need_b else None, read_stride, padding, dilation,
            False, [0] * len(read_stride), groups, [need_x, need_w, need_b])
        del wide
        if need_x:
            grad_x_parts.append(slot_grad(grad_wide, xs, M, rule, 1))
        del grad_wide
        grad_w = part_w if grad_w is None or part_w is None else grad_w.add_(part_w)
        grad_b = part_b if grad_b is None or part_b is None else grad_b.add_(part_b)
    grad_x = None
    if need_x:
        grad_x = grad_x_parts[0] if len(grad_x_parts) == 1 else torch.cat(grad_x_parts).contiguous(
            memory_format=_conv_memory_format(x_read))
    if grad_x is not None and x_read is not x:  # the positions the strided 1x1 kernel skips get 0
        read = grad_x
        grad_x = torch.zeros_like(x)
        grad_x[_strided_positions(stride)] = read
    if grad_w is not None and wide_weight.dim() == 3:
        grad_w = grad_w.squeeze(2)  # a conv1d weight's gradient has its shape
    return grad_x, grad_w, grad_b


def _conv_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
        stride, padding, dilation, groups = ctx.conf
        grad_x, grad_w = differentiable_grads(
            lambda xx, ww: projected_conv2d(xx, ww, None, stride, padding, dilation, groups, ctx.M, ctx.rule),
            x, weight, grad, need_x, need_w)
        grad_b = grad.sum((0, 2, 3)) if need_b and ctx.bias_sizes is not None else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None
    grad_x, grad_w, grad_b = _projected_conv_grads(grad, x, weight, ctx.bias_sizes, ctx.conf, ctx.M, ctx.rule,
                                                   need_x, need_w, need_b)
    return grad_x, grad_w, grad_b, None, None, None, None, None, None


sas_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup)


# ---------------------------------------------------------------- from a dense weight
#
# Under ``torch.compile(backend="sas")`` on a dense model the weights are the model's dense
# parameters. These ops take the dense weight and expand it to the wide one once per
# parameter version (an optimizer step or load_state_dict is seen through the version
# counter), never per call; the wide tensor never leaves the op, so no caller can alias it.


class SASTrainingError(RuntimeError):
    """A backward would train dense weights through their SAS expansion without being asked to."""


_wide_cache = PerWeightCache()


def wide_weight(weight: Tensor, M: int, fold_relu: bool, rule: str, groups: int = 1,
                transposed: bool = False) -> Tensor:
    """The expanded weight of ``weight`` (``expand_dense_weight``, or ``expand_transposed_weight``
    for a transposed convolution's), cached per parameter and version.

    Every in-place write bumps a tensor's version counter (optimizer steps, ``load_state_dict``,
    in-place initialisation under ``no_grad``), so the cache follows them; writes through
    ``.data`` bypass the counter, as they bypass autograd's checks: call
    :func:`clear_wide_weight_cache` after such writes.
    """
    if transposed:
        return _wide_cache.get(weight, ("wide transposed", M, bool(fold_relu), rule),
                               lambda: expand_transposed_weight(weight.detach(), M, fold_relu=fold_relu, rule=rule))
    return _wide_cache.get(weight, ("wide", M, bool(fold_relu), rule, groups),
                           lambda: expand_dense_weight(weight.detach(), M, fold_relu=fold_relu, rule=rule,
                                                       groups=groups))


def clear_wide_weight_cache() -> None:
    """Forget every cached expansion and packed weight (after writing weights through ``.data``)."""
    _wide_cache.clear()
    _packed_cache.clear()


def _training_refusal() -> SASTrainingError:
    return SASTrainingError(
        "a backward reached a dense layer that torch.compile(backend='sas') computes through the SAS expansion "
        "of its dense weight: training it trains the dense weights (the dense model's training, without SAS's "
        "extra capacity). To train a SAS model, call model = sas_compile.sasify(model, M=...) first and train "
        "that (compiling it with backend='sas' keeps its SAS layers); to train the dense weights through the "
        "expansion, pass options={'train_dense': True}; for inference only, run under torch.no_grad()."
    )


@torch.library.custom_op("sas::refuse_dense_training", mutates_args=())
def refuse_dense_training(weight: Tensor) -> Tensor:
    """Stands for a dense weight's gradient that was not asked for: running it raises.

    Why an op: under torch.compile the backward is traced ahead of time, so the refusal must
    happen when the compiled backward runs, not while it is traced (inference needs no no_grad).
    """
    raise _training_refusal()


@refuse_dense_training.register_fake
def _(weight):
    return torch.empty_like(weight)


@torch.library.custom_op("sas::linear_from_dense", mutates_args=())
def sas_linear_from_dense(x: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, fold_relu: bool, rule: str,
                          train_dense: bool) -> Tensor:
    """``sas::linear`` with the wide weight expanded (and cached) from the dense ``weight``."""
    wide = wide_weight(weight, M, fold_relu, rule)
    return owned(F.linear(project_transient(x, M, -1, rule, dead_slots(wide)), wide, bias))


@sas_linear_from_dense.register_kernel("cuda")
def _(x, weight, bias, M, fold_relu, rule, train_dense):
    wide = wide_weight(weight, M, fold_relu, rule)
    with torch.no_grad():  # autograd is the op's
        return owned(sas_matmul(x, wide, bias, M=M, rule=rule))


@sas_linear_from_dense.register_fake
def _(x, weight, bias, M, fold_relu, rule, train_dense):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _from_dense_linear_setup(ctx, inputs, output):
    x, weight, bias, M, fold_relu, rule, train_dense = inputs
    _fit_workspace_to_training(x, M)
    ctx.save_for_backward(x, weight)
    ctx.conf = (M, fold_relu, rule, train_dense)


def _from_dense_linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    M, fold_relu, rule, train_dense = ctx.conf
    # plain ops (no cache): AOT autograd traces the backward
    wide = expand_dense_weight(weight, M, fold_relu=fold_relu, rule=rule)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = slot_grad(grad.matmul(wide), x, M, rule, x.dim() - 1)
    if ctx.needs_input_grad[1] and not train_dense:
        grad_w = torch.ops.sas.refuse_dense_training(weight)
    elif ctx.needs_input_grad[1]:
        projected = project_transient(x, M, -1, rule, _backward_dead_mask(x, wide))
        grad_wide = grad.reshape(-1, grad.shape[-1]).t().matmul(projected.reshape(-1, projected.shape[-1]))
        grad_w = fold_wide_grad(grad_wide, M, fold_relu=fold_relu, rule=rule)
    if ctx.needs_input_grad[2]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b, None, None, None, None


sas_linear_from_dense.register_autograd(_from_dense_linear_backward, setup_context=_from_dense_linear_setup)


@torch.library.custom_op("sas::conv2d_from_dense", mutates_args=())
def sas_conv2d_from_dense(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
                          dilation: List[int], groups: int, M: int, fold_relu: bool, rule: str,
                          train_dense: bool) -> Tensor:
    """``sas::conv2d`` with the wide weight expanded (and cached) from the dense ``weight``.

    A 3-D ``weight`` is a conv1d weight, the kernel of height 1: the graph passes the dense
    parameter itself, so the cache sees one tensor per parameter (never a per-call view).
    """
    wide = wide_weight(weight, M, fold_relu, rule, groups)
    return _projected_conv2d(x, wide, bias, stride, padding, dilation, groups, M, rule)


@sas_conv2d_from_dense.register_kernel("cuda")
def _(x, weight, bias, stride, padding, dilation, groups, M, fold_relu, rule, train_dense):
    wide = wide_weight(weight, M, fold_relu, rule, groups)
    return _sas_conv2d_accelerated(x, wide, bias, stride, padding, dilation, groups, M, rule)


@sas_conv2d_from_dense.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, M, fold_relu, rule, train_dense):
    return _conv_output(x, weight, stride, padding, dilation)


def _from_dense_conv_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, M, fold_relu, rule, train_dense = inputs
    save_conv_context(ctx, x, weight, bias, (list(stride), list(padding), list(dilation), groups), M)
    ctx.sas = (M, fold_relu, rule, train_dense)


def from_dense_conv_backward(ctx, grad, expand, fold, grads):
    """``(grad_x, grad_w, grad_b)`` of a convolution's ``*_from_dense`` op (``sas::conv2d_from_dense``,
    ``sas::conv_transpose_from_dense``), whose setup saved ``(x, dense weight)``, ``ctx.conf``,
    ``ctx.bias_sizes`` and ``ctx.sas = (M, fold_relu, rule, train_dense)``: the dense weight is
    expanded again (``expand``), the wide op's gradients taken (``grads``, as
    ``_projected_conv_grads``) and the wide weight gradient folded back (``fold``). Without
    ``train_dense`` a weight gradient asked for is refused (``sas::refuse_dense_training``)."""
    x, weight = ctx.saved_tensors
    M, fold_relu, rule, train_dense = ctx.sas
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    train_w = need_w and train_dense
    wide = expand(weight, M, fold_relu=fold_relu, rule=rule)
    grad_x, grad_wide_w, grad_b = grads(grad, x, wide, ctx.bias_sizes, ctx.conf, M, rule, need_x, train_w,
                                        need_b and ctx.bias_sizes is not None)
    if train_w:
        grad_w = fold(grad_wide_w, M, fold_relu=fold_relu, rule=rule)
    else:
        grad_w = torch.ops.sas.refuse_dense_training(weight) if need_w else None
    return grad_x, grad_w, grad_b


def _from_dense_conv_backward(ctx, grad):
    groups = ctx.conf[3]
    grads = from_dense_conv_backward(ctx, grad, functools.partial(expand_dense_weight, groups=groups),
                                     functools.partial(fold_wide_grad, groups=groups), _projected_conv_grads)
    return grads + (None,) * 8


sas_conv2d_from_dense.register_autograd(_from_dense_conv_backward, setup_context=_from_dense_conv_setup)


def dense_linear_through(x, weight, bias, M: int, fold_relu: bool, rule: str, train_dense: bool):
    """What ``sas::linear_from_dense`` computes, as the dense layer: ``W relu(z)`` or ``W x``."""
    return F.linear(torch.relu(x) if fold_relu else x, weight, bias)


def dense_conv2d_through(x, weight, bias, stride, padding, dilation, groups, M: int, fold_relu: bool, rule: str,
                         train_dense: bool):
    """What ``sas::conv2d_from_dense`` computes, as the dense convolution."""
    return _conv_nd(torch.relu(x) if fold_relu else x, _kernel_2d(weight), bias, stride, padding, dilation, groups)


def resolve_conv_padding(
    padding, kernel_size: Optional[Sequence[int]], dilation: Sequence[int], stride: Sequence[int]
):
    """Turn ``'same'`` / ``'valid'`` / ints into ``(symmetric padding per dim, extra F.pad or None)``.

    ``'same'`` with an odd total padding pads one more at the end of that dim (bottom/right),
    as PyTorch does. The number of spatial dims is ``len(stride)``; ``kernel_size`` is read
    for ``'same'`` only.
    """
    dims = len(stride)
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * dims, None
        if padding != "same":
            raise ValueError(f"padding={padding!r}: expected 'same', 'valid' or integers")
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions (PyTorch rule)")
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        sym = [t // 2 for t in totals]
        extra = [t - 2 * s for t, s in zip(totals, sym)]
        if any(extra):
            pad = []  # F.pad order: the last dim first, (before, after) each
            for amount in reversed(extra):
                pad += [0, amount]
            return sym, tuple(pad)
        return sym, None
    if isinstance(padding, int):
        return [padding] * dims, None
    padding = list(padding)
    return padding, None


def _conv_arguments(x: Tensor, weight: Tensor, stride, padding, dilation):
    """``(x, stride, padding, dilation)`` as ``sas::conv2d`` takes them, from ``F.conv2d``'s
    forms: ints or lists, and ``'same'`` with an odd total padding as an ``F.pad`` of ``x``.
    Reads ``x``'s rank only where an int gives no count of dims (a symbolic trace records lists)."""
    if isinstance(stride, int) and isinstance(dilation, int):
        dims = x.dim() - 2
    else:
        dims = len(dilation) if isinstance(stride, int) else len(stride)
    per_dim = lambda v: [v] * dims if isinstance(v, int) else list(v)  # noqa: E731
    stride, dilation = per_dim(stride), per_dim(dilation)
    kernel = [int(k) for k in _kernel_2d(weight).shape[2:]] if isinstance(padding, str) else None  # 'same' only
    padding, extra = resolve_conv_padding(padding, kernel, dilation, stride)
    return (x if extra is None else F.pad(x, extra)), stride, padding, dilation


def batch_of_one(x: Tensor, weight: Tensor, transposed: bool = False) -> Tensor:
    """``x`` with a batch dim: an unbatched input (``[C, H, W]``, ``[C, D, H, W]`` for a 5-D weight),
    which ``F.conv2d`` takes too, gains one, since the ops project along dim 1. A transposed
    convolution's batched input has its weight's rank (its 1-D form runs as it is)."""
    return x if x.dim() == (weight.dim() if transposed else max(weight.dim(), 4)) else x.unsqueeze(0)


def unbatched_like(out: Tensor, x: Tensor, weight: Tensor, transposed: bool = False) -> Tensor:
    """``out`` without the batch dim :func:`batch_of_one` gave an unbatched ``x``."""
    return out if x.dim() == (weight.dim() if transposed else max(weight.dim(), 4)) else out.squeeze(0)


# a symbolic trace that enters a SAS layer (torch.fx.symbolic_trace of a SAS model) records these
# two as calls: they read the input's rank, which a traced proxy has only at run time
torch.fx.wrap("batch_of_one")
torch.fx.wrap("unbatched_like")


def sas_conv2d_call(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
                    dilation: List[int], groups: int, M: int, rule: str) -> Tensor:
    """``sas::conv2d`` with the arguments of ``F.conv2d`` (ints or lists, string padding), or its
    composite form where a transform needs it (``torch.func``, forward AD). An unbatched input
    runs as a batch of one (:func:`batch_of_one`).

    TorchScript compiles it (a scripted SAS layer or rewritten graph calls it) with the op's own
    lists, and skips the eager-only part."""
    batched = batch_of_one(x, weight)
    if not torch.jit.is_scripting():
        batched, stride, padding, dilation = _conv_arguments(batched, weight, stride, padding, dilation)
        if composite_transform_active():
            out = projected_conv2d(batched, weight, bias, stride, padding, dilation, groups, M, rule)
            return unbatched_like(out, x, weight)
    out = torch.ops.sas.conv2d(batched, weight, bias, stride, padding, dilation, groups, M, rule)
    return unbatched_like(out, x, weight)


def sas_linear_call(x: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, rule: str) -> Tensor:
    """``sas::linear``, or its composite form where a transform needs it (``torch.func``, forward AD);
    TorchScript compiles the op call alone."""
    if not torch.jit.is_scripting():
        if composite_transform_active():
            return projected_linear(x, weight, bias, M, rule)
    return torch.ops.sas.linear(x, weight, bias, M, rule)


def sas_conv1d_call(x, weight, bias, stride, padding, dilation, groups, M: int, rule: str):
    """A 1-D SAS convolution as a 2-D one of height 1 (same projection, same weights); ``x`` is
    ``[N, C, L]`` or unbatched ``[C, L]``.

    The op takes the 3-D weight itself (the kernel of height 1): a per-call ``unsqueeze`` view
    would miss the per-weight caches (dead slots, unfolded weight) on every call.
    """
    first = lambda v: v if isinstance(v, (int, str)) else v[0]  # noqa: E731
    stride, dilation, pad = [1, first(stride)], [1, first(dilation)], first(padding)
    padding = pad if isinstance(pad, str) else [0, pad]
    return sas_conv2d_call(x.unsqueeze(-2), weight, bias, stride, padding, dilation, groups, M, rule).squeeze(-2)


# under torch.autocast, x, weight and bias are cast to the region's dtype, as for aten::linear
_autocast_library = torch.library.Library("sas", "IMPL")
register_autocast_like_linear(torch.ops.sas.linear, (0, 1, 2), _autocast_library)
register_autocast_like_linear(torch.ops.sas.conv2d, (0, 1, 2), _autocast_library)
register_autocast_like_linear(torch.ops.sas.linear_from_dense, (0, 1, 2), _autocast_library)
register_autocast_like_linear(torch.ops.sas.conv2d_from_dense, (0, 1, 2), _autocast_library)
