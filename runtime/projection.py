"""Sparse projection S: a narrow activation becomes M slots per value, one of them nonzero.

Why this module exists: every SAS consumer (the ops, the CPU/CUDA/emulator targets, the
function-preserving weight conversion, the CUTLASS packing check) must agree on which slot
a value lands in. An *index rule* computes that slot from the activations; the value in the
slot is always ``|x|``. The wide layout is channel-major: slot ``m`` of channel ``c`` sits
at wide index ``c * M + m``.

Rules
-----
``sign_pattern`` (the default, any M = 2**b):
    channels form groups of ``b`` neighbours along the channel axis; the group pattern
    ``I = sum_j [x_(g*b+j) <= 0] * 2**j`` is the slot of every channel in the group; a last
    partial group uses the bits it has. For M = 2 (b = 1) this is exactly the reference
    code's sign rule: slot 0 = max(x, 0), slot 1 = max(-x, 0).
"""
from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import host_kernels

__all__ = [
    "IndexRule",
    "SignPatternRule",
    "register_rule",
    "get_rule",
    "check_M",
    "slot_index",
    "project",
    "project_transient",
    "release_workspace",
    "shrink_workspace",
    "WORKSPACE_LIMIT_BYTES",
    "project_aten",
    "expand_transposed_weight",
    "fold_transposed_grad",
    "zero_rows",
    "dead_rows",
    "dead_slots",
    "infinite_meets_dead_slots",
    "zero_columns",
    "is_builtin_sign_rule",
    "is_builtin_sign_rule_m2",
    "PerWeightCache",
    "reference_project",
    "expand_dense_weight",
    "fold_wide_grad",
    "slot_signs",
]


def check_M(M, *, what: str = "M") -> int:
    """Return ``M`` as an int if it is a power of two >= 2, else raise a ValueError."""
    if isinstance(M, bool) or not isinstance(M, int) or M < 2 or (M & (M - 1)) != 0:
        raise ValueError(
            f"{what}={M!r} is not supported: SAS needs M to be a power of two >= 2 "
            "(allowed: 2, 4, 8, 16, ...)"
        )
    return M


@dataclass(frozen=True)
class IndexRule:
    """How a projection picks the nonzero slot of each value.

    Subclasses implement :meth:`slot` (the slot of every value, same shape as ``x``) and
    :meth:`encodes_positive` (whether slot ``m`` of a channel at group position ``j`` means
    the value was positive), which is all the function-preserving conversion needs.
    """

    M: int

    name = "abstract"

    def slot(self, x: Tensor, dim: int) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def encodes_positive(self, channels: int) -> Tensor:  # pragma: no cover - interface
        """Bool tensor ``[channels, M]``: True where slot m of channel c encodes x_c > 0."""
        raise NotImplementedError


@dataclass(frozen=True)
class SignPatternRule(IndexRule):
    """Sign pattern over groups of ``b = log2(M)`` neighbouring channels (BRIEF section 1)."""

    name = "sign_pattern"

    @property
    def bits(self) -> int:
        return int(math.log2(self.M))

    def slot(self, x: Tensor, dim: int) -> Tensor:
        nonpos = (x <= 0).view(torch.uint8)
        b = self.bits
        if b == 1:
            return nonpos
        dim = dim % x.dim()
        channels = x.shape[dim]
        pad = (-channels) % b
        if pad:
            # a last partial group uses the bits it has: missing neighbours contribute 0
            pad_shape = list(x.shape)
            pad_shape[dim] = pad
            nonpos = torch.cat([nonpos, nonpos.new_zeros(pad_shape)], dim)
        grouped = nonpos.unflatten(dim, (-1, b))
        weights = (1 << torch.arange(b, device=x.device, dtype=torch.uint8)).view(b, *[1] * (x.dim() - dim - 1))
        pattern = (grouped * weights).sum(dim + 1, keepdim=True, dtype=torch.uint8)
        return pattern.expand_as(grouped).flatten(dim, dim + 1).narrow(dim, 0, channels)

    def encodes_positive(self, channels: int) -> Tensor:
        b = self.bits
        position = torch.arange(channels) % b
        slots = torch.arange(self.M)
        return ((slots.unsqueeze(0) >> position.unsqueeze(1)) & 1) == 0


_RULES: Dict[str, Callable[[int], IndexRule]] = {}


_RULE_INSTANCES: Dict[Tuple[str, int], Tuple[Callable[[int], IndexRule], IndexRule]] = {}


def register_rule(name: str, factory: Callable[[int], IndexRule]) -> None:
    """Make an index rule available to the ops under ``name`` (``factory(M) -> IndexRule``; rules
    are immutable, so each ``(name, M)`` is made once per factory)."""
    _RULES[name] = factory


def get_rule(name: str, M: int) -> IndexRule:
    """The index rule called ``name`` for ``M`` slots."""
    made = _RULE_INSTANCES.get((name, M)) if type(M) is int else None  # 2.0 == 2: checked below
    if made is not None and _RULES.get(name) is made[0]:  # every SAS layer call asks for its rule
        return made[1]
    check_M(M)
    try:
        factory = _RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown SAS index rule {name!r}; registered rules: {sorted(_RULES)}"
        ) from None
    rule = factory(M)
    _RULE_INSTANCES[(name, M)] = (factory, rule)
    return rule


register_rule("sign_pattern", SignPatternRule)


def slot_index(x: Tensor, M: int, dim: int = -1, rule: str = "sign_pattern") -> Tensor:
    """Slot (0..M-1, uint8) that each value of ``x`` occupies in the projection along ``dim``."""
    return get_rule(rule, M).slot(x, dim)


def is_builtin_sign_rule(index_rule: IndexRule) -> bool:
    """The default rule itself (the host kernels hard-code it), not a subclass that may change
    :meth:`~IndexRule.slot`: that one goes through the generic path."""
    return type(index_rule) is SignPatternRule


def is_builtin_sign_rule_m2(index_rule: IndexRule) -> bool:
    """The default rule at M = 2 (slot 0 = max(x, 0)): the fast paths hard-code exactly that,
    so a subclass that changes :meth:`~IndexRule.slot` goes through the generic path."""
    return type(index_rule) is SignPatternRule and index_rule.M == 2


def _is_channels_last(x: Tensor) -> bool:
    """``x`` is a channels_last 4-D or channels_last_3d 5-D tensor (and not also contiguous)."""
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return last is not None and not x.is_contiguous() and x.is_contiguous(memory_format=last)


def project(x: Tensor, M: int, dim: int = -1, rule: str = "sign_pattern", dead: Optional[Tensor] = None) -> Tensor:
    """The projected activation ``S(x)``: ``x`` widened M times along ``dim``, channel-major.

    The slots are written straight into their final layout (for the built-in sign rule in one
    pass by the host kernels, ``runtime/host_kernels.py``, where they are built): no zero-filled tensor, no
    scatter and no temporary of ``x``'s size, and never ``0 * inf`` (an
    infinite value stays in its slot, every other slot is exactly 0). ``dead`` (bool, one entry
    per wide index along ``dim``, from :func:`dead_slots`) zeroes the slots whose weight column
    is all zero: their product is 0 for finite values, and the same 0 instead of
    ``0 * inf = NaN`` for infinite ones, which is what the dense layer gives
    (``W relu(-inf) = 0``). A channels_last 4-D (channels_last_3d 5-D) input gives an output in
    that layout.
    """
    return _project(x, M, dim, rule, dead, x.new_empty)


def project_transient(x: Tensor, M: int, dim: int = -1, rule: str = "sign_pattern",
                      dead: Optional[Tensor] = None) -> Tensor:
    """:func:`project` for one kernel call that reads the wide tensor and lets it go.

    Why: a SAS layer's wide activation lives for one GEMM or convolution (the backward
    recomputes it from the narrow input). A fresh allocation of that size costs page faults
    on every call (the allocator returns large blocks to the OS), as much as the projection
    itself on a busy machine; here the planes are written into a per-thread CPU workspace,
    kept at the largest size seen (at most ``WORKSPACE_LIMIT_BYTES``; larger projections are
    allocated as by :func:`project`; a training forward shrinks it as the network narrows,
    :func:`shrink_workspace`). The result is overwritten by the thread's next call:
    callers must not return it, save it or let it escape. :func:`release_workspace` frees it.
    Without autograd only (the differentiable form allocates).

    ``dead`` (from :func:`dead_slots`) is applied only where it changes the product: for finite
    values the dead slots' zero weight columns already give 0, so those slots may keep ``|x|``
    (where ``project`` writes 0) and are zeroed only when ``x`` holds +-inf or NaN. The host
    kernels check that as they project, a block of ``x`` at a time while it is in cache, and only
    when ``dead`` is given; no layer pays a separate pass over ``x``.
    """
    return _project(x, M, dim, rule, dead, lambda shape: _workspace_empty(shape, x), dead_if_nonfinite=True)


WORKSPACE_LIMIT_BYTES = 1 << 30
_workspace = threading.local()


def _workspace_empty(shape, like: Tensor) -> Tensor:
    numel = math.prod(shape)
    if (like.device.type != "cpu" or type(like) not in (Tensor, torch.nn.Parameter)
            or numel * like.element_size() > WORKSPACE_LIMIT_BYTES):
        return like.new_empty(shape)
    buffers = getattr(_workspace, "buffers", None)
    if buffers is None:
        buffers = _workspace.buffers = {}
    buffer = buffers.get(like.dtype)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(like.dtype, None)  # free the old block before allocating the larger one
        with torch.inference_mode(False):  # a normal tensor, usable inside and outside inference mode
            buffer = buffers[like.dtype] = torch.empty(numel, dtype=like.dtype)
    return buffer[:numel].view(shape)


def shrink_workspace(numel: int, dtype: torch.dtype) -> None:
    """Free this thread's ``dtype`` workspace when it holds more than 4x ``numel`` values (a
    caller that now needs ``numel``: the next call allocates what it needs)."""
    buffers = getattr(_workspace, "buffers", None)
    if buffers and dtype in buffers and buffers[dtype].numel() > 4 * numel:
        del buffers[dtype]


def release_workspace() -> None:
    """Free this thread's projection workspace (:func:`project_transient`); the next SAS layer
    call allocates it again."""
    _workspace.buffers = {}


def _project(x: Tensor, M: int, dim: int, rule: str, dead: Optional[Tensor], empty,
             dead_if_nonfinite: bool = False) -> Tensor:
    dim = dim % x.dim()
    if dim == 1 and _is_channels_last(x):  # project the channels-last view: the result is channels-last too
        return _project(x.movedim(1, -1), M, -1, rule, dead, empty, dead_if_nonfinite).movedim(-1, 1)
    index_rule = get_rule(rule, M)
    if torch.is_grad_enabled() and x.requires_grad:
        # differentiable form (out= writes are not): the same planes, stacked
        if is_builtin_sign_rule_m2(index_rule):
            planes = [x.clamp_min(0), (-x).clamp_min(0)]
        else:
            slot, magnitude = index_rule.slot(x, dim), x.abs()
            planes = [torch.where(slot == m, magnitude, torch.zeros((), dtype=x.dtype, device=x.device))
                      for m in range(M)]
        wide = torch.stack(planes, dim + 1)
        if dead is not None:
            wide = wide.masked_fill(_dead_view(dead, wide, dim), 0)
        return wide.flatten(dim, dim + 1)
    shape = list(x.shape)
    shape[dim] *= M
    wide = empty(shape)  # allocated flat: no reshape on the fast path
    check = dead is not None and dead_if_nonfinite
    finite = None
    if is_builtin_sign_rule(index_rule):
        finite = host_kernels.project_sign(x, wide, dim, M, check_finite=check)
    # one vectorised pass in C (runtime/host_kernels.py), which checks x if asked
    if finite is not None and (dead is None or (check and finite)):
        return wide
    slots = wide.unflatten(dim, (x.shape[dim], M))
    if finite is None:
        if is_builtin_sign_rule_m2(index_rule):
            # the reference convention: slot 0 = max(x, 0), slot 1 = max(-x, 0); the second plane
            # negated in place (no temporary of x's size: one more allocation per call is as
            # costly as a pass)
            torch.clamp_min(x, 0, out=slots.select(dim + 1, 0))
            negative = slots.select(dim + 1, 1)
            torch.neg(x, out=negative)
            negative.clamp_min_(0)
        else:
            slot = index_rule.slot(x, dim)
            magnitude = x.abs()
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            for m in range(M):
                torch.where(slot == m, magnitude, zero, out=slots.select(dim + 1, m))
        if check and x.is_cpu and _all_finite(x):
            dead = None  # a sum over x is cheaper than the mask over the wide tensor; on an
            # accelerator the check would stop the host until the device caught up: masked
    if dead is not None:
        slots.masked_fill_(_dead_view(dead, slots, dim), 0)
    return wide


def _dead_view(dead: Tensor, wide: Tensor, dim: int) -> Tensor:
    """``dead`` ([channels * M] along ``dim``) shaped to broadcast over the ``[..., C, M, ...]`` tensor."""
    channels, M = wide.shape[dim], wide.shape[dim + 1]
    shape = [1] * wide.dim()
    shape[dim], shape[dim + 1] = channels, M
    return dead.to(wide.device).reshape(shape)


def owned(t: Tensor) -> Tensor:
    """``t`` as a tensor of its own, for a custom op to return: never a view.

    Autograd forbids writing in place into a custom op's output that is a view (it cannot rebase
    a view made inside the op onto the op's backward), and models do write into layer outputs
    (``hidden[mask] = embedding``, ``out += residual``). ``F.linear`` on a 3-D input with a bias
    returns a view of its 2-D product; ``detach`` gives the same storage without the view link.
    """
    return t.detach() if t._is_view() else t


class PerWeightCache:
    """Values derived from a weight, kept until the weight's version counter moves.

    Keyed by the tensor's identity (a weak reference: an entry dies with its weight) and
    recomputed after any in-place write (optimizer step, ``load_state_dict``). Writes through
    ``.data`` bypass the version counter: :meth:`clear` after such writes.
    """

    def __init__(self):
        self._lock = threading.RLock()  # a dying weight's callback may run while it is held
        self._entries: Dict[int, Tuple[weakref.ref, Dict[Any, Tuple[tuple, Any]]]] = {}

    def _forget(self, key: int):
        def callback(_ref):
            with self._lock:
                self._entries.pop(key, None)
        return callback

    def get(self, weight: Tensor, key, make: Callable[[], Any]):
        """``make()``'s value for ``weight`` at its current version, made once per version.

        Values are made outside inference mode (normal tensors, usable in any mode: a mask or
        expansion first made under ``torch.inference_mode`` may later be saved for a backward).
        An inference tensor has no version counter, so an in-place write to it (allowed inside
        inference mode) could not be seen: for such a weight nothing is cached."""
        if weight.is_inference():
            with torch.no_grad(), torch.inference_mode(False):
                return make()
        version = (weight._version, weight.data_ptr(), weight.dtype, weight.device, tuple(weight.shape))
        with self._lock:
            entry = self._entries.get(id(weight))
            if entry is None or entry[0]() is not weight:
                try:
                    entry = (weakref.ref(weight, self._forget(id(weight))), {})
                except TypeError:  # a tensor that cannot be weakly referenced: no cache
                    entry = (lambda: None, {})
                else:
                    self._entries[id(weight)] = entry
            hit = entry[1].get(key)
            if hit is None or hit[0] != version:
                with torch.no_grad(), torch.inference_mode(False):
                    hit = entry[1][key] = (version, make())
            return hit[1]

    def holds_values(self) -> bool:
        """Whether any weight has a value here (a lock-free test for callers on every call)."""
        return bool(self._entries)

    def forget(self, weight: Tensor) -> None:
        """Drop every value cached for ``weight`` (its memory goes now, not when the weight dies)."""
        with self._lock:
            entry = self._entries.get(id(weight))
            if entry is not None and entry[0]() is weight:
                del self._entries[id(weight)]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_dead_cache = PerWeightCache()


def dead_slots(weight: Tensor, groups: int = 1) -> Optional[Tensor]:
    """Bool ``[wide inputs]``: the wide input channels whose weight column is all zero, or None if none.

    A function-preserving conversion with a folded ReLU starts with such columns (the slots of
    negative values), and so does any weight a user zeroed. For a grouped convolution a column
    is read by its own group's output channels only, so each group is judged on its rows
    (``groups * weight.shape[1]`` entries). Cached per weight version.
    """
    def make():
        dead = zero_columns(weight.detach(), groups)
        return dead if bool(dead.any()) else None

    return _dead_cache.get(weight, ("dead_slots", groups), make)


def zero_columns(weight: Tensor, groups: int = 1) -> Tensor:
    """Bool ``[groups * weight.shape[1]]``: :func:`dead_slots` as plain ops, every entry, no cache
    (what a traced graph computes)."""
    per_group = weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
    return (per_group == 0).all(dim=-1).all(dim=1).flatten()


def infinite_meets_dead_slots(x: Tensor, weight: Tensor, groups: int = 1) -> bool:
    """Whether ``x`` holds a non-finite value and the weight an all-zero column: then a GEMM
    on ``S(x)`` would form ``0 * inf = NaN`` where the dense layer gives 0."""
    return dead_slots(weight, groups) is not None and not _all_finite(x)


def _all_finite(x: Tensor) -> bool:
    """True only if every value of ``x`` is finite, in one reduction: a sum is finite exactly when
    no value is +-inf or NaN, unless finite values overflow it (then False: the caller masks,
    which is exact anyway). ``isfinite(x).all()`` is four passes and 10x slower."""
    return bool(torch.isfinite(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)))


def project_aten(x: Tensor, M: int, dim: int = -1, rule: str = "sign_pattern") -> Tensor:
    """``S(x)`` as plain out-of-place ops (the slot planes stacked), for graphs a compiler fuses
    and for autograd to differentiate.

    The same values as :func:`project`, and the ops' derivative: each value's magnitude in its
    rule's slot, ``+1`` for ``x > 0`` and ``-1`` otherwise (``sas_ops.slot_grad``, the derivative
    from the left at 0; ``clamp_min`` planes, the previous form, passed both slots' gradients at
    an exact 0). A compiler such as inductor fuses it with the elementwise ops around it
    (BatchNorm, ReLU) into one pass that writes the wide tensor.
    """
    dim = dim % x.dim()
    slot = get_rule(rule, M).slot(x, dim)
    magnitude = torch.where(x > 0, x, -x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.stack([torch.where(slot == m, magnitude, zero) for m in range(M)], dim + 1).flatten(dim, dim + 1)


def reference_project(x: Tensor, M: int, dim: int = -1, rule: str = "sign_pattern") -> Tensor:
    """The reference code's formulation: a zero-filled ``[..., C, M, ...]`` tensor plus scatter.

    Kept only as the slow baseline for tests and benchmarks.
    """
    dim = dim % x.dim()
    slot = get_rule(rule, M).slot(x, dim).to(torch.int64).unsqueeze(dim + 1)
    shape = list(x.shape)
    shape.insert(dim + 1, M)
    wide = torch.zeros(shape, dtype=x.dtype, device=x.device)
    wide.scatter_(dim + 1, slot, x.abs().unsqueeze(dim + 1))
    return wide.flatten(dim, dim + 1)


def slot_signs(channels: int, M: int, *, fold_relu: bool = False, rule: str = "sign_pattern",
               dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """``[channels, M]``: ``s_c(m)``, +1 where slot m of channel c encodes ``x_c > 0``, else -1
    (0 with ``fold_relu``: the slot encodes a value the ReLU would have zeroed)."""
    positive = get_rule(rule, M).encodes_positive(channels).to(device=device)
    return positive.to(dtype) if fold_relu else positive.to(dtype) * 2 - 1


def _grouped_signs(weight: Tensor, M: int, fold_relu: bool, rule: str, groups: int) -> Tensor:
    per_group = weight.shape[1]
    signs = slot_signs(per_group * groups, M, fold_relu=fold_relu, rule=rule, dtype=weight.dtype, device=weight.device)
    # [groups, 1 (outputs of the group), per_group, M, 1 per kernel dim]
    return signs.view(groups, 1, per_group, M, *([1] * (weight.dim() - 2)))


def expand_dense_weight(
    weight: Tensor, M: int, *, fold_relu: bool = False, rule: str = "sign_pattern", groups: int = 1
) -> Tensor:
    """Function-preserving wide weight: ``Wt[:, c*M + m] = s_c(m) * W[:, c]``.

    ``weight`` is a linear ``[out, in]`` or conv ``[out, in/groups, kh, kw]`` weight.
    ``s = +1`` where slot m encodes ``x_c > 0`` and ``-1`` otherwise, so ``Wt S(x) = W x``.
    With ``fold_relu`` the layer's input is the pre-ReLU tensor ``z`` and ``s = +1 / 0``, so
    ``Wt S(z) = W relu(z)``. For a grouped conv the rule sees the global channel index. One
    broadcast multiply writes the wide weight (the signs are a ``[channels, M]`` table).
    """
    out_channels, per_group = weight.shape[0], weight.shape[1]
    kernel = weight.shape[2:]
    grouped = weight.reshape(groups, out_channels // groups, per_group, 1, *kernel)
    wide = grouped * _grouped_signs(weight, M, fold_relu, rule, groups)
    return wide.reshape(out_channels, per_group * M, *kernel)


def expand_transposed_weight(weight: Tensor, M: int, *, fold_relu: bool = False,
                             rule: str = "sign_pattern") -> Tensor:
    """:func:`expand_dense_weight` of a transposed convolution's weight ``[in, out/groups, *kernel]``:
    its input channels are dim 0, numbered across the groups, so ``Wt[c*M + m] = s_c(m) W[c]``
    whatever the groups (each group's wide channels stay one block of dim 0)."""
    channels = weight.shape[0]
    signs = slot_signs(channels, M, fold_relu=fold_relu, rule=rule, dtype=weight.dtype, device=weight.device)
    wide = weight.unsqueeze(1) * signs.view(channels, M, *([1] * (weight.dim() - 1)))
    return wide.reshape(channels * M, *weight.shape[1:])


def fold_transposed_grad(grad_wide: Tensor, M: int, *, fold_relu: bool = False, rule: str = "sign_pattern") -> Tensor:
    """The adjoint of :func:`expand_transposed_weight`: ``dW[c] = sum_m s_c(m) dWt[c*M + m]``."""
    channels = grad_wide.shape[0] // M
    signs = slot_signs(channels, M, fold_relu=fold_relu, rule=rule, dtype=grad_wide.dtype, device=grad_wide.device)
    per_slot = grad_wide.reshape(channels, M, *grad_wide.shape[1:])
    return (per_slot * signs.view(channels, M, *([1] * (grad_wide.dim() - 1)))).sum(1)


def zero_rows(weight: Tensor) -> Tensor:
    """Bool ``[weight.shape[0]]``: the input channels of a transposed convolution's weight whose
    every weight is zero (what :func:`zero_columns` is for a convolution's), as plain ops."""
    return (weight.reshape(weight.shape[0], -1) == 0).all(dim=1)


def dead_rows(weight: Tensor) -> Optional[Tensor]:
    """:func:`dead_slots` of a transposed convolution's wide weight (its input channels are rows),
    or None if none; cached per weight version."""
    def make():
        dead = zero_rows(weight.detach())
        return dead if bool(dead.any()) else None

    return _dead_cache.get(weight, ("dead_rows",), make)


def fold_wide_grad(
    grad_wide: Tensor, M: int, *, fold_relu: bool = False, rule: str = "sign_pattern", groups: int = 1
) -> Tensor:
    """The adjoint of :func:`expand_dense_weight`: the gradient of the dense weight from the
    wide weight's, ``dW[:, c] = sum_m s_c(m) dWt[:, c*M + m]``."""
    out_channels, wide_in = grad_wide.shape[0], grad_wide.shape[1]
    per_group = wide_in // M
    kernel = grad_wide.shape[2:]
    grouped = grad_wide.reshape(groups, out_channels // groups, per_group, M, *kernel)
    signs = slot_signs(per_group * groups, M, fold_relu=fold_relu, rule=rule, dtype=grad_wide.dtype,
                       device=grad_wide.device).view(groups, 1, per_group, M, *([1] * len(kernel)))
    return (grouped * signs).sum(3).reshape(out_channels, per_group, *kernel)
