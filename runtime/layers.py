"""SAS layers: modules that own a wide weight and call the ``sas::`` ops.

A SAS layer reads the narrow activation ``x`` (``in_features`` / ``in_channels`` wide), projects
it to ``M`` slots per value inside the op, and multiplies by its ``M`` times wider weight.
Mults per output position equal the narrow layer's; parameters grow ``M`` times.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import sas_ops  # noqa: F401  (registers torch.ops.sas.*)
from .projection import check_M, expand_dense_weight, get_rule
from .sas_ops import sas_conv1d_call, sas_conv2d_call, sas_linear_call

__all__ = ["SASLinear", "SASConv2d", "SASConv1d", "SAS_LAYERS"]


def _init_like_narrow(weight: torch.Tensor, bias: Optional[torch.Tensor], fan_in: int) -> None:
    # one slot in M is nonzero, so the effective fan-in is the narrow one (nn.Linear's bound)
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(weight, -bound, bound)
    if bias is not None:
        nn.init.uniform_(bias, -bound, bound)


def _parameters_like(layer: nn.Module, wide: torch.Tensor):
    """(weight, bias) Parameters of a converted layer: a frozen dense weight gives a frozen wide one."""
    weight = nn.Parameter(wide, requires_grad=layer.weight.requires_grad)
    if layer.bias is None:
        return weight, None
    return weight, nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)


class _SASBase(nn.Module):
    M: int
    rule: str

    def _check(self, M: int, rule: str) -> None:
        check_M(M)
        get_rule(rule, M)
        self.M, self.rule = M, rule

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A dense checkpoint's weight (the narrow shape: input side M times smaller) gets one error
        saying what works, in place of the bare size mismatch."""
        weight = state_dict.get(prefix + "weight")
        own = self.weight
        if (isinstance(weight, torch.Tensor) and weight.dim() == own.dim() and weight.shape[0] == own.shape[0]
                and weight.shape[1] * self.M == own.shape[1] and weight.shape[2:] == own.shape[2:]):
            error_msgs.append(
                f"{prefix}weight has the dense layer's shape {tuple(weight.shape)}, not this M={self.M} SAS "
                f"layer's {tuple(own.shape)}: a dense checkpoint. Load it into the dense model and sasify that "
                f"(the conversion keeps its function), or load a checkpoint saved from a SAS model")
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight"}
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            if prefix + "weight" in missing_keys:  # reported above, not as missing
                missing_keys.remove(prefix + "weight")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class SASLinear(_SASBase):
    """``y = Wt S(x) + b`` with ``x`` of width ``in_features`` and ``Wt`` of ``out x M*in``."""

    def __init__(self, in_features: int, out_features: int, M: int = 2, bias: bool = True,
                 rule: str = "sign_pattern", device=None, dtype=None):
        super().__init__()
        self._check(M, rule)
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, M * in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        _init_like_narrow(self.weight, self.bias, in_features)

    @classmethod
    def from_dense(cls, layer: nn.Linear, M: int = 2, *, fold_relu: bool = False,
                   rule: str = "sign_pattern") -> "SASLinear":
        """Function-preserving conversion: ``SASLinear(x) == layer(x)`` (``layer(relu(x))`` if folded).

        The new Parameters keep ``requires_grad``, dtype and device of ``layer``'s.
        """
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._check(M, rule)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        with torch.no_grad():
            wide = expand_dense_weight(layer.weight.detach(), M, fold_relu=fold_relu, rule=rule)
        new.weight, new.bias = _parameters_like(layer, wide)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sas_linear_call(x, self.weight, self.bias, self.M, self.rule)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, M={self.M}, "
                f"bias={self.bias is not None}")


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class _SASConvNd(_SASBase):
    """A SAS convolution. ``padding_mode`` is ``nn.Conv2d``'s: a mode other than ``'zeros'`` pads
    the narrow input with ``F.pad`` before the op (which then pads nothing), exactly as the dense
    layer pads its input: reflect, replicate and circular padding copy values, and ``S`` acts on
    each value alone, so padding ``x`` and then projecting is padding ``S(x)``."""

    _dims = 2
    padding_mode = "zeros"  # a SAS layer pickled before padding modes existed reads this

    def __init__(self, in_channels: int, out_channels: int, kernel_size, M: int = 2, stride=1,
                 padding=0, dilation=1, groups: int = 1, bias: bool = True,
                 rule: str = "sign_pattern", device=None, dtype=None, padding_mode: str = "zeros"):
        super().__init__()
        self._check(M, rule)
        tup = lambda v: (v,) * self._dims if isinstance(v, int) else tuple(v)  # noqa: E731
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = tup(kernel_size), tup(stride), tup(dilation)
        self.padding = padding if isinstance(padding, str) else tup(padding)
        self._set_padding_mode(padding_mode)
        kw = {"device": device, "dtype": dtype}
        shape = (out_channels, in_channels // groups * M, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        _init_like_narrow(self.weight, self.bias, in_channels // groups * math.prod(self.kernel_size))

    def _set_padding_mode(self, padding_mode: str) -> None:
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode={padding_mode!r}: expected one of {', '.join(map(repr, PADDING_MODES))}")
        self.padding_mode = padding_mode
        if padding_mode == "zeros":
            return
        # F.pad's amounts, last dimension first: (left, right) per dimension, 'same' putting the
        # odd one on the right as PyTorch does
        amounts = []
        for i in reversed(range(self._dims)):
            if self.padding == "valid":
                before = after = 0
            elif self.padding == "same":
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                before, after = total // 2, total - total // 2
            else:
                before = after = self.padding[i]
            amounts += [before, after]
        self._mode_pad = tuple(amounts)

    def _op_input(self, x: torch.Tensor):
        """``(input, padding)`` for the op: the input padded here where the mode is not zeros."""
        if self.padding_mode == "zeros":
            return x, self.padding
        return F.pad(x, self._mode_pad, mode=self.padding_mode), (0,) * self._dims

    @classmethod
    def from_dense(cls, layer, M: int = 2, *, fold_relu: bool = False, rule: str = "sign_pattern"):
        """Function-preserving conversion of an ``nn.Conv{1,2}d`` (any ``padding_mode``)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._check(M, rule)
        new.in_channels, new.out_channels, new.groups = layer.in_channels, layer.out_channels, layer.groups
        new.kernel_size, new.stride, new.dilation = tuple(layer.kernel_size), tuple(layer.stride), tuple(layer.dilation)
        new.padding = layer.padding
        new._set_padding_mode(getattr(layer, "padding_mode", "zeros"))
        with torch.no_grad():
            wide = expand_dense_weight(layer.weight.detach(), M, fold_relu=fold_relu, rule=rule, groups=layer.groups)
        new.weight, new.bias = _parameters_like(layer, wide)
        return new

    def extra_repr(self) -> str:
        mode = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, M={self.M}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}{mode}")


class SASConv2d(_SASConvNd):
    """A 2-D convolution on the projected input: ``conv2d(S(x), Wt)``, ``Wt`` has ``M*Cin`` channels."""

    _dims = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._op_input(x)
        return sas_conv2d_call(x, self.weight, self.bias, self.stride, padding, self.dilation,
                               self.groups, self.M, self.rule)


class SASConv1d(_SASConvNd):
    """A 1-D convolution on the projected input (run as a 2-D one of height 1)."""

    _dims = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = self._op_input(x)
        return sas_conv1d_call(x, self.weight, self.bias, self.stride, padding, self.dilation,
                               self.groups, self.M, self.rule)


SAS_LAYERS = (SASLinear, SASConv2d, SASConv1d)
