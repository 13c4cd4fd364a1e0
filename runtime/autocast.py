"""Autocast rules for the ``sas::`` and ``swat::`` ops: cast as ``aten::linear`` does.

Why this module exists: under ``torch.autocast`` PyTorch casts the operands of
``aten::linear`` / ``aten::conv2d`` to the autocast dtype, but a custom op is left alone,
so a sparse layer fed a bfloat16 activation met its float32 weight and failed.
``torch.library.register_autocast`` casts to one dtype fixed at registration; these rules
read the dtype of the autocast region at call time (float16 or bfloat16, per device), cast
the named floating-point operands that live on that device (float64 is left alone, as
autocast does) and run the op below autocast. Gradients flow back through the casts to
the float32 parameters. When autograd does not record (inference), a parameter is cast once
per version and the cast reused, as autocast's own weight cache does within a region.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .projection import PerWeightCache

__all__ = ["register_autocast_like_linear", "AUTOCAST_DEVICES"]

AUTOCAST_DEVICES = ("cpu", "cuda")


_inference_casts = PerWeightCache()


def _cast(value, device_type: str, dtype: torch.dtype):
    if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64
            and value.device.type == device_type and value.dtype != dtype):
        # eager parameters only: under a compiler's tracing a parameter is a fake tensor (no data)
        if type(value) is torch.nn.Parameter and not (torch.is_grad_enabled() and value.requires_grad):
            return _inference_cast(value, dtype)
        return value.to(dtype)
    return value


def _inference_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A parameter's cast when autograd does not record it: one per parameter version, so the
    ops' per-weight caches (dead slots, expansions) see one tensor. A fresh cast per call missed
    them all: a weight-sized scan per layer and call, and on a GPU a host sync per layer.
    Kept while the parameter lives, like the half-precision copy a ``model.half()`` would be."""
    def make():
        with torch.inference_mode(False):  # a normal tensor, usable inside and outside inference mode
            return weight.to(dtype)

    return _inference_casts.get(weight, ("autocast", dtype), make)


def register_autocast_like_linear(op: torch._ops.OpOverloadPacket, cast_positions: Sequence[int],
                                  library: torch.library.Library,
                                  device_types: Iterable[str] = AUTOCAST_DEVICES) -> None:
    """Register autocast kernels for ``op`` that cast its arguments at ``cast_positions``."""
    overload = op.default
    name = overload._schema.name.split("::", 1)[1]
    positions = frozenset(cast_positions)
    for device_type in device_types:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

        def kernel(*args, _device_type=device_type, _keyset=keyset):
            dtype = torch.get_autocast_dtype(_device_type)
            args = tuple(_cast(a, _device_type, dtype) if i in positions else a for i, a in enumerate(args))
            with torch._C._ExcludeDispatchKeyGuard(_keyset):
                return overload(*args)

        library.impl(name, kernel, key_name)
