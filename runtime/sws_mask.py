"""The SWS weight mask: a 1:M magnitude mask as a ``torch.nn.utils.parametrize`` parametrization.

Why here, beside the ops: the mask decides which weights the SWS kernels store and multiply
(``packing.pack_sws_weight`` packs exactly the weights it keeps), and both the SWS rewrite
(``passes/widen_for_sws.py``) and users' own layers register it.

The weight is viewed row-major as ``[out, in/groups * kernel]`` and flattened; every chunk of
M consecutive weights keeps exactly one, the largest magnitude, and a last partial chunk keeps
one: the paper's count ``ceil(in * out / M)``. The mask is recomputed every forward in training
with a straight-through gradient; ``freeze_mask=True`` computes it once and trains only the kept
weights. In eval mode, without autograd, the masked weight is cached until the weight changes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .projection import check_M

__all__ = ["OneOfMMask", "one_of_m_mask", "sws_mask_of"]


def one_of_m_mask(weight: Tensor, M: int) -> Tensor:
    """Bool mask keeping the largest-magnitude weight of every M consecutive (row-major) weights."""
    flat = weight.detach().reshape(-1).abs()
    n = flat.numel()
    pad = (-n) % M
    if pad:
        # a last partial chunk keeps one of the weights it has: padding can never win
        flat = torch.cat([flat, flat.new_full((pad,), -1.0)])
    keep = flat.view(-1, M).argmax(dim=1)
    mask = torch.zeros(flat.numel() // M, M, dtype=torch.bool, device=weight.device)
    mask.scatter_(1, keep.unsqueeze(1), True)
    return mask.view(-1)[:n].view(weight.shape)


class OneOfMMask(nn.Module):
    """Parametrization: the 1:M masked weight (see the module docstring for the pattern).

    ``state_dict`` keeps the plain dense weight (``parametrizations.weight.original``).
    """

    def __init__(self, M: int, freeze_mask: bool = False):
        super().__init__()
        self.M = check_M(M)
        self.freeze_mask = freeze_mask
        self.register_buffer("frozen", None, persistent=False)
        self._cache: Optional[Tensor] = None
        self._cache_key = None

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def mask(self, weight: Tensor) -> Tensor:
        """The current bool mask of ``weight`` (the frozen one when ``freeze_mask``)."""
        if self.freeze_mask:
            if self.frozen is None or self.frozen.shape != weight.shape:
                self.frozen = one_of_m_mask(weight, self.M)
            return self.frozen
        return one_of_m_mask(weight, self.M)

    def forward(self, weight: Tensor) -> Tensor:
        if not self.training and not torch.is_grad_enabled():
            key = (weight.data_ptr(), weight._version, weight.shape, weight.dtype)
            if self._cache is None or self._cache_key != key:
                self._cache = weight.detach() * self.mask(weight)
                self._cache_key = key
            return self._cache
        mask = self.mask(weight)
        if self.freeze_mask:
            return weight * mask
        # straight-through: forward uses the masked weight, backward reaches every weight
        return weight + (weight * mask - weight).detach()

    def extra_repr(self) -> str:
        return f"M={self.M}, freeze_mask={self.freeze_mask}"


def sws_mask_of(module: nn.Module, name: str = "weight") -> Optional[OneOfMMask]:
    """The :class:`OneOfMMask` parametrizing ``module.<name>``, or None when it has none."""
    if module is None or not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in getattr(module.parametrizations, name) if isinstance(p, OneOfMMask)), None)
