"""SAS layers: modules that own a wide weight and call the ``sas::`` ops.

A SAS layer reads the narrow activation ``x`` (``in_features`` / ``in_channels`` wide), projects
it to ``M`` slots per value inside the op, and multiplies by its ``M`` times wider weight.
Mults per output position equal the narrow layer's; parameters grow ``M`` times.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import sas_ops  # noqa: F401  (registers torch.ops.sas.*)
from . import sas_transposed  # noqa: F401  (registers torch.ops.sas.conv_transpose*)
from .projection import check_M, expand_dense_weight, expand_transposed_weight, get_rule
from .sas_ops import resolve_conv_padding, sas_conv2d_call, sas_linear_call
from .sas_transposed import sas_conv_transpose_call

__all__ = ["SASLinear", "SASConv2d", "SASConv1d", "SASConv3d", "SASConvTranspose1d", "SASConvTranspose2d",
           "SASConvTranspose3d", "SAS_LAYERS"]


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
    # M (int) and rule (str) are set by _check; no class annotations: TorchScript reads those
    # as types and cannot resolve them as the strings this module's annotations are

    def _dense_weight_shape(self):
        """The dense layer's weight shape: dim 1, the input side, M times narrower."""
        return (self.weight.shape[0], self.weight.shape[1] // self.M, *self.weight.shape[2:])

    def _set_geometry(self, in_channels: int, out_channels: int, groups: int, **per_dim) -> None:
        """A convolution's channels and groups, and each per-dim size (an int for every dim, a
        sequence, or a string padding kept as it is) as a tuple of ``self._dims``."""
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by "
                             f"groups={groups}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        for name, value in per_dim.items():
            if not isinstance(value, str):
                value = (value,) * self._dims if isinstance(value, int) else tuple(value)
            setattr(self, name, value)

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
        if isinstance(weight, torch.Tensor) and tuple(weight.shape) == self._dense_weight_shape():
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
        self._set_geometry(in_channels, out_channels, groups, kernel_size=kernel_size, stride=stride,
                           dilation=dilation, padding=padding)
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

    def _op_arguments(self):
        """The layer as the op's 2-D convolution: ``(pad, pad_mode, stride, padding, dilation)``.

        ``pad`` is what ``F.pad`` adds to the (2-D) input first, in ``pad_mode``, or None: the
        padding mode's amounts (the op then pads nothing), or the extra row and column of
        ``'same'`` with an odd total. The other three are the op's lists. A conv1d is a conv2d of
        height 1 (its input ``[N, C, L]`` or unbatched ``[C, L]`` gains the height before ``L``).
        From the layer's own sizes, never its weight's shape, which ``torch.jit.trace``
        records as tensors."""
        if self._dims == 1:
            stride, dilation, kernel = [1, self.stride[0]], [1, self.dilation[0]], [1, self.kernel_size[0]]
            padding = self.padding if isinstance(self.padding, str) else (0, self.padding[0])
        else:
            stride, dilation, kernel = list(self.stride), list(self.dilation), list(self.kernel_size)
            padding = self.padding
        if self.padding_mode != "zeros":
            pad = list(self._mode_pad) + [0, 0] * (2 - self._dims)  # a conv1d's height is not padded
            return pad, self.padding_mode, stride, [0] * len(stride), dilation
        padding, extra = resolve_conv_padding(padding, kernel, dilation, stride)
        return (None if extra is None else list(extra)), "constant", stride, list(padding), dilation

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this first: the op's arguments become typed attributes the
        scripted forward reads (``_script_pad`` is never empty: TorchScript cannot type an
        empty list; ``_script_pads`` says whether it applies)."""
        pad, mode, stride, padding, dilation = self._op_arguments()
        self._script_dims = self._dims  # a class attribute, which TorchScript does not read
        self._script_pads = pad is not None
        self._script_pad, self._script_pad_mode = pad if pad is not None else [0], mode
        self._script_stride, self._script_padding, self._script_dilation = stride, padding, dilation
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch alone
            x = x.unsqueeze(-2) if self._script_dims == 1 else x
            if self._script_pads:
                x = F.pad(x, self._script_pad, self._script_pad_mode)
            out = sas_conv2d_call(x, self.weight, self.bias, self._script_stride, self._script_padding,
                                  self._script_dilation, self.groups, self.M, self.rule)
            return out.squeeze(-2) if self._script_dims == 1 else out
        else:
            pad, mode, stride, padding, dilation = self._op_arguments()
            x = x.unsqueeze(-2) if self._dims == 1 else x
            if pad is not None:
                x = F.pad(x, pad, mode)
            out = sas_conv2d_call(x, self.weight, self.bias, stride, padding, dilation, self.groups, self.M,
                                  self.rule)
            return out.squeeze(-2) if self._dims == 1 else out

    @classmethod
    def from_dense(cls, layer, M: int = 2, *, fold_relu: bool = False, rule: str = "sign_pattern"):
        """Function-preserving conversion of an ``nn.Conv{1,2,3}d`` (any ``padding_mode``)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._check(M, rule)
        new._set_geometry(layer.in_channels, layer.out_channels, layer.groups, kernel_size=layer.kernel_size,
                          stride=layer.stride, dilation=layer.dilation, padding=layer.padding)
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


class SASConv1d(_SASConvNd):
    """A 1-D convolution on the projected input (run as a 2-D one of height 1)."""

    _dims = 1


class SASConv3d(_SASConvNd):
    """A 3-D convolution on the projected input: ``conv3d(S(x), Wt)``, ``Wt`` has ``M*Cin`` channels."""

    _dims = 3


class _SASConvTransposeNd(_SASBase):
    """A SAS transposed convolution: ``conv_transpose(S(x), Wt)``, ``Wt`` of ``[M * in, out/groups,
    *kernel]`` (``sas::conv_transpose``). Its forward takes ``output_size`` as the dense layer's does."""

    _dims = 2
    transposed = True  # as nn.ConvTranspose*d says it
    # the dense layer's own rule from output_size to output_padding (it reads only the arguments
    # and self.output_padding)
    _output_padding = nn.modules.conv._ConvTransposeNd._output_padding

    def __init__(self, in_channels: int, out_channels: int, kernel_size, M: int = 2, stride=1, padding=0,
                 output_padding=0, groups: int = 1, bias: bool = True, dilation=1, rule: str = "sign_pattern",
                 device=None, dtype=None):
        super().__init__()
        self._check(M, rule)
        self._set_geometry(in_channels, out_channels, groups, kernel_size=kernel_size, stride=stride, padding=padding,
                           output_padding=output_padding, dilation=dilation)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(in_channels * M, out_channels // groups, *self.kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw)) if bias else None
        # one of M slots is nonzero: the fan-in is the dense layer's (PyTorch's, for a transposed layer)
        _init_like_narrow(self.weight, self.bias, out_channels // groups * math.prod(self.kernel_size))

    @classmethod
    def from_dense(cls, layer, M: int = 2, *, fold_relu: bool = False, rule: str = "sign_pattern"):
        """Function-preserving conversion of an ``nn.ConvTranspose{1,2,3}d``."""
        if layer.padding_mode != "zeros":  # PyTorch's transposed layers refuse other modes in forward
            raise ValueError(f"padding_mode={layer.padding_mode!r}: a transposed convolution pads with zeros only")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new._check(M, rule)
        new._set_geometry(layer.in_channels, layer.out_channels, layer.groups, kernel_size=layer.kernel_size,
                          stride=layer.stride, padding=layer.padding, output_padding=layer.output_padding,
                          dilation=layer.dilation)
        with torch.no_grad():
            wide = expand_transposed_weight(layer.weight.detach(), M, fold_relu=fold_relu, rule=rule)
        new.weight, new.bias = _parameters_like(layer, wide)
        return new

    def _dense_weight_shape(self):
        """The dense layer's weight shape: dim 0, its input channels, M times narrower."""
        return (self.weight.shape[0] // self.M, *self.weight.shape[1:])

    def __prepare_scriptable__(self):
        """``torch.jit.script`` reads instance attributes only: the class's dim count becomes one."""
        self._script_dims = self._dims
        return self

    def forward(self, x: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        dims = self._script_dims if torch.jit.is_scripting() else self._dims
        output_padding = self._output_padding(x, output_size, list(self.stride), list(self.padding),
                                              list(self.kernel_size), dims, list(self.dilation))
        return sas_conv_transpose_call(x, self.weight, self.bias, list(self.stride), list(self.padding),
                                       output_padding, list(self.dilation), self.groups, self.M, self.rule)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, M={self.M}, "
                f"stride={self.stride}, padding={self.padding}, output_padding={self.output_padding}, "
                f"dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")


class SASConvTranspose1d(_SASConvTransposeNd):
    """A 1-D transposed convolution on the projected input."""

    _dims = 1


class SASConvTranspose2d(_SASConvTransposeNd):
    """A 2-D transposed convolution on the projected input."""

    _dims = 2


class SASConvTranspose3d(_SASConvTransposeNd):
    """A 3-D transposed convolution on the projected input."""

    _dims = 3


SAS_LAYERS = (SASLinear, SASConv2d, SASConv1d, SASConv3d, SASConvTranspose1d, SASConvTranspose2d, SASConvTranspose3d)
