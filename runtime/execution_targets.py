"""Where a sparse product runs: one protocol, one capability table, one place that decides.

Why this module exists: the ops call ``sas_matmul`` / ``sws_matmul`` without knowing where
they run; each target answers the same three questions: is it available here
(:meth:`status`), can it compute this call and if not why (:meth:`check`, read from
:data:`KERNEL_CAPABILITIES`), and computing it (:meth:`run`).

* ``"torch"``: the PyTorch formulation (projection + ``F.linear`` for SAS, the unpacked weight
  + ``F.linear`` for SWS) on whatever device the tensors are on. (``"cpu"`` is its old name,
  still accepted: it never meant the device.)
* ``"cuda"``: the Sparse Tensor Core kernels of ``runtime/cuda`` on a GPU.
* ``"emulator"``: the same kernels' CUDA source compiled for the host (``runtime/emulator``),
  on CPU tensors, launched through the same launcher with a driver look-alike.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .packing import PackedSparseWeight, unpack_sws_weight
from .projection import dead_slots, infinite_meets_dead_slots, project_transient

__all__ = ["TargetStatus", "Capability", "KERNEL_CAPABILITIES", "TARGET_NAMES", "get_target", "targets",
           "tf32_allowed", "TorchTarget", "KernelTarget"]

TARGET_NAMES = ("torch", "cuda", "emulator")
_ALIASES = {"cpu": "torch"}


class TargetStatus(NamedTuple):
    """Whether a target can run on this machine, and why (or why not)."""

    available: bool
    reason: str

    def __str__(self) -> str:
        return f"{'yes' if self.available else 'no'}: {self.reason}"


@dataclass(frozen=True)
class Capability:
    """What a kernel computes: dtypes, M values (None: any) and index rules (None: any)."""

    dtypes: Tuple[torch.dtype, ...]
    M: Optional[Tuple[int, ...]] = None
    rules: Optional[Tuple[str, ...]] = None


# mma.sp 2:4 for 16-bit types, tf32 1:2 for float32; the SAS kernels compute the sign rule
KERNEL_CAPABILITIES: Dict[str, Capability] = {
    "sas_linear": Capability((torch.float16, torch.bfloat16, torch.float32), M=(2, 4), rules=("sign_pattern",)),
    "sws_linear": Capability((torch.float16, torch.bfloat16, torch.float32)),
}


def tf32_allowed() -> bool:
    """Whether PyTorch would run a float32 CUDA matmul in tf32 now (its switches, not ours).

    ``torch.backends.cuda.matmul.fp32_precision`` ("ieee", "tf32", or "none": inherit the
    global ``torch.backends.fp32_precision``) reflects the legacy switches too
    (``allow_tf32``, ``set_float32_matmul_precision``); reading a legacy switch after the new
    API was used raises, so the legacy ones are read only on a torch without it.
    """
    matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if matmul is None:
        return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"
    if matmul == "none":
        matmul = getattr(torch.backends, "fp32_precision", "none")
    return matmul == "tf32"


class TorchTarget:
    """The PyTorch formulation, on any device; always available, computes every call."""

    name = "torch"

    def status(self) -> TargetStatus:
        return TargetStatus(True, f"PyTorch formulation (torch {torch.__version__}), any device")

    def check(self, op: str, x: Tensor, *others: Optional[Tensor], M: Optional[int] = None,
              rule: Optional[str] = None) -> List[str]:
        return []

    def sas_linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, rule: str) -> Tensor:
        return F.linear(project_transient(x, M, -1, rule, dead_slots(weight)), weight, bias)

    def sws_linear(self, x: Tensor, packed: PackedSparseWeight, bias: Optional[Tensor]) -> Tensor:
        return F.linear(x, unpack_sws_weight(packed), bias)


class KernelTarget:
    """The sparse kernels on one device type, through the module that builds and launches them."""

    def __init__(self, name: str, device_type: str, module: str):
        self.name, self.device_type, self._module_name = name, device_type, module
        self._status: Optional[TargetStatus] = None

    def module(self):
        """The kernel module (ImportError when it cannot be imported)."""
        return importlib.import_module(self._module_name)

    def status(self, refresh: bool = False) -> TargetStatus:
        if self._status is None or refresh:
            self._status = self._probe()
        return self._status

    def _probe(self) -> TargetStatus:
        try:
            module = self.module()
        except ImportError as error:
            return TargetStatus(False, f"{self._module_name} could not be imported: {error}")
        ok, reason = module.available()
        if ok and self.device_type == "cuda" and not torch.cuda.is_available():
            # the driver may work while this torch build has no CUDA tensors to hand it
            return TargetStatus(False, f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)")
        return TargetStatus(bool(ok), str(reason))

    def check(self, op: str, x: Tensor, *others: Optional[Tensor], M: Optional[int] = None,
              rule: Optional[str] = None) -> List[str]:
        """Why the kernels cannot compute this call (empty when they can), from the capability table."""
        cap = KERNEL_CAPABILITIES[op]
        reasons = []
        if x.dtype not in cap.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in cap.dtypes)
            reasons.append(f"dtype {x.dtype} is not supported by the kernels ({names})")
        elif x.dtype == torch.float32 and not tf32_allowed():
            reasons.append(
                "float32 would be multiplied as tf32, and PyTorch's tf32 switches are off "
                "(torch.backends.cuda.matmul.allow_tf32 is False, float32 matmul precision 'highest'): "
                "full precision instead"
            )
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *others)):
            reasons.append("inputs require grad and the kernels have no backward")
        if x.numel() == 0:
            reasons.append("empty input")
        if cap.M is not None and M is not None and M not in cap.M:
            reasons.append(f"M = {M} has no kernel (kernels run M = {' and '.join(map(str, cap.M))})")
        if cap.rules is not None and rule is not None and rule not in cap.rules:
            reasons.append(f"index rule {rule!r} has no kernel (kernels compute {cap.rules[0]!r})")
        if op == "sas_linear" and others and others[0] is not None and not reasons:
            if infinite_meets_dead_slots(x, others[0]):
                reasons.append("infinite inputs meet all-zero weight columns: the tensor cores would form "
                               "0 * inf = NaN where the dense layer gives 0")
        return reasons

    def sas_linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, rule: str) -> Tensor:
        """``S(x) @ weight.T + bias`` by the kernel; ``x`` (..., K)."""
        k, n = x.shape[-1], weight.shape[0]
        out = self.module().sas_gemm(x.reshape(-1, k).contiguous(), weight.contiguous(),
                                     None if bias is None else bias.contiguous(), M)
        return out.reshape(*x.shape[:-1], n)

    def sws_linear(self, x: Tensor, packed: PackedSparseWeight, bias: Optional[Tensor]) -> Tensor:
        """``x @ unpack(packed).T + bias`` by the kernel; ``x`` (..., K)."""
        n, k = packed.shape
        out = self.module().sws_gemm(x.reshape(-1, k).contiguous(), packed, None if bias is None else bias.contiguous())
        return out.reshape(*x.shape[:-1], n)


_TARGETS = {
    "torch": TorchTarget(),
    "cuda": KernelTarget("cuda", "cuda", "sas_compile.runtime.cuda"),
    "emulator": KernelTarget("emulator", "cpu", "sas_compile.runtime.emulator"),
}


def get_target(name: str):
    """The target called ``name`` ("torch", "cuda", "emulator"; "cpu" means "torch")."""
    try:
        return _TARGETS[_ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"target={name!r} is not one of {list(TARGET_NAMES)} (or 'auto')") from None


def targets(refresh: bool = False) -> Dict[str, TargetStatus]:
    """What this machine can run: ``{name: TargetStatus(available, reason)}`` for "torch",
    "cuda" and "emulator"; the reason says what runs, or what is missing (no CUDA driver or
    device, no NVRTC, no host compiler). Probed once per process; ``refresh=True`` probes again."""
    out = {}
    for name, target in _TARGETS.items():
        out[name] = target.status(refresh) if isinstance(target, KernelTarget) else target.status()
    return out
