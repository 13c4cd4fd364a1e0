"""The GEMM entry points of the runtime: one op interface, three targets.

Why this module exists: the rewritten model calls ``sas_matmul`` / ``sws_matmul`` without
knowing where it runs. A target is an implementation of the same product:

* ``"cpu"``: the PyTorch formulation (``F.linear(project(x, M), weight, bias)`` for SAS, a
  dense matmul with the unpacked weight for SWS). It runs on whatever device the tensors are
  on, so it is also the fallback on CUDA tensors.
* ``"cuda"``: the Sparse Tensor Core kernels of ``sas_compile.runtime.cuda``.
* ``"emulator"``: the same CUDA source compiled for the host (``sas_compile.runtime.emulator``),
  on CPU tensors: slow, for checking the kernels without a GPU.
* ``"auto"``: on CUDA tensors, the fastest correct implementation among the Sparse Tensor
  Core kernel, the PyTorch formulation (projection + cuBLAS) and projection + PyTorch's vendor
  2:4 kernels (cuSPARSELt / CUTLASS), measured once per shape bucket and cached on disk
  (``runtime/autotune.py``; ``SAS_COMPILE_GEMM`` forces one); ``"cpu"`` elsewhere.

Whenever a kernel target cannot take a call (M not in {2, 4}, a dtype the kernels lack, a
custom index rule, inputs that need autograd, no CUDA runtime under ``"auto"``), the call runs
on the PyTorch formulation and the reason is logged on logger ``sas_compile.runtime``.

Precision follows PyTorch's convention for float32: the kernels multiply float32 operands
as tf32 (10 mantissa bits), so they take float32 only where PyTorch itself would use tf32 for
a float32 matmul (``torch.backends.cuda.matmul.allow_tf32`` on, or
``torch.set_float32_matmul_precision("high" | "medium")``); by default a float32 call runs the
full-precision PyTorch formulation, as a dense float32 model would.
"""
from __future__ import annotations

import importlib
import logging
from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import autotune
from .packing import PackedSparseWeight, unpack_sws_weight
from .projection import check_M, get_rule, project

__all__ = ["sas_matmul", "sws_matmul", "targets", "tf32_allowed", "sas_kernel_blockers", "sas_linear_choice",
           "vendor_24_status",
           "TargetStatus", "TARGETS"]

logger = logging.getLogger("sas_compile.runtime")

TARGETS = ("auto", "cpu", "cuda", "emulator")
_KERNEL_TARGETS = {"cuda": "sas_compile.runtime.cuda", "emulator": "sas_compile.runtime.emulator"}
# what the kernels implement: mma.sp 2:4 for 16-bit types, tf32 1:2 for float32
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNEL_M = (2, 4)
_KERNEL_RULE = "sign_pattern"


class TargetStatus(NamedTuple):
    """Whether a target can run on this machine, and why (or why not)."""

    available: bool
    reason: str

    def __str__(self) -> str:
        return f"{'yes' if self.available else 'no'}: {self.reason}"


_status_cache: Dict[str, TargetStatus] = {}


def _kernel_module(target: str):
    """The kernel module of ``target``, or raise ImportError."""
    return importlib.import_module(_KERNEL_TARGETS[target])


def _probe(target: str) -> TargetStatus:
    if target == "cpu":
        return TargetStatus(True, f"PyTorch formulation (torch {torch.__version__}), any device")
    name = _KERNEL_TARGETS[target]
    try:
        module = _kernel_module(target)
    except ImportError as error:
        return TargetStatus(False, f"{name} could not be imported: {error}")
    available = getattr(module, "available", None)
    if available is None:
        return TargetStatus(False, f"{name} provides no kernels (no available() function)")
    ok, reason = available()
    if ok and target == "cuda" and not torch.cuda.is_available():
        # the driver may work while this torch build has no CUDA tensors to hand it
        return TargetStatus(
            False,
            f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)",
        )
    return TargetStatus(bool(ok), str(reason))


def targets(refresh: bool = False) -> Dict[str, TargetStatus]:
    """What this machine can run: ``{name: TargetStatus(available, reason)}``.

    Names are "cpu", "cuda" and "emulator"; the reason says what runs, or what is missing
    (no CUDA driver or device, no NVRTC, no host compiler).

    The probe result is cached per process; ``refresh=True`` probes again.
    """
    if refresh:
        _status_cache.clear()
    for target in ("cpu", "cuda", "emulator"):
        if target not in _status_cache:
            _status_cache[target] = _probe(target)
    return dict(_status_cache)


def _target_status(target: str) -> TargetStatus:
    if target not in _status_cache:
        _status_cache[target] = _probe(target)
    return _status_cache[target]


def _check_target(op: str, target) -> str:
    if target not in TARGETS:
        raise ValueError(f"{op}: target={target!r} is not one of {list(TARGETS)}")
    return target


def _check_tensor(op: str, name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_like(op: str, name: str, value: Tensor, x: Tensor) -> None:
    """``value`` must share ``x``'s dtype and device (F.linear and the kernels need both)."""
    if value.dtype != x.dtype:
        raise ValueError(
            f"{op}: {name} has dtype {value.dtype} but x has {x.dtype}; cast one of them"
        )
    if value.device != x.device:
        raise ValueError(
            f"{op}: {name} is on {value.device} but x is on {x.device}; move them to one device"
        )


def _check_bias(op: str, bias: Optional[Tensor], x: Tensor, n: int) -> None:
    if bias is None:
        return
    _check_tensor(op, "bias", bias)
    if bias.shape != (n,):
        raise ValueError(
            f"{op}: bias must have shape ({n},) to match the output width, "
            f"got {tuple(bias.shape)}"
        )
    _check_like(op, "bias", bias, x)


def _resolve(op: str, target: str, x: Tensor, blockers: list) -> str:
    """Pick the implementation: "cpu", "cuda" or "emulator"; log why a kernel is not used."""
    if target == "cpu":
        return "cpu"
    if target == "auto":
        if not x.is_cuda:
            return "cpu"
        status = _target_status("cuda")
        if not status.available:
            logger.info(
                "%s: running the PyTorch formulation on CUDA tensors: cuda target unavailable (%s)",
                op,
                status.reason,
            )
            return "cpu"
        target = "cuda"
    else:
        if target == "cuda" and not x.is_cuda:
            raise ValueError(
                f"{op}: target='cuda' needs CUDA tensors, x is on {x.device}; "
                "use target='auto' or 'cpu'"
            )
        if target == "emulator" and x.device.type != "cpu":
            raise ValueError(
                f"{op}: target='emulator' runs on CPU tensors, x is on {x.device}; "
                "move x to the CPU"
            )
        status = _target_status(target)
        if not status.available:
            raise RuntimeError(
                f"{op}: target={target!r} is not available on this machine: {status.reason}"
            )
    reasons = [reason for reason in blockers if reason]
    if reasons:
        logger.info(
            "%s: target %r falls back to the PyTorch formulation: %s",
            op,
            target,
            "; ".join(reasons),
        )
        return "cpu"
    return target


def tf32_allowed() -> bool:
    """Whether PyTorch would run a float32 matmul in tf32 now (its switches, not ours)."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def _common_blockers(x: Tensor, *others: Optional[Tensor]) -> list:
    reasons = []
    if x.dtype not in _KERNEL_DTYPES:
        reasons.append(
            f"dtype {x.dtype} is not supported by the kernels (float16, bfloat16, float32)"
        )
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
    return reasons


def sas_matmul(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    M: int = 2,
    target: str = "auto",
    rule: str = "sign_pattern",
) -> Tensor:
    """``F.linear(S(x), weight, bias)``: the SAS layer product from the narrow activation.

    ``x``: (..., K) narrow activation; ``weight``: (N, M*K) wide weight in the channel-major
    layout (slot m of channel c is column c*M + m); ``bias``: (N,) or None. Returns (..., N)
    in x's dtype. ``target``: "auto" | "cpu" | "cuda" | "emulator" (see the module docstring);
    the kernels run M = 2 and 4 with the ``sign_pattern`` rule, other cases fall back to the
    PyTorch formulation with a logged reason.
    """
    op = "sas_matmul"
    _check_target(op, target)
    check_M(M, what=f"{op}: M")
    get_rule(rule, M)  # unknown rule -> ValueError listing the registered ones
    _check_tensor(op, "x", x)
    _check_tensor(op, "weight", weight)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension (..., K), got a scalar")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be floating point, got {x.dtype}")
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != M * k:
        raise ValueError(
            f"{op}: weight must be the wide weight (N, M*K) = (N, {M * k}) for x with K = {k} "
            f"and M = {M}, got shape {tuple(weight.shape)} (a dense (N, K) weight becomes wide "
            "through runtime.projection.expand_dense_weight)"
        )
    _check_like(op, "weight", weight, x)
    n = weight.shape[0]
    _check_bias(op, bias, x, n)

    chosen = _resolve(op, target, x, sas_kernel_blockers(x, weight, bias, M, rule))
    if chosen == "cpu":
        return F.linear(project(x, M, -1, rule), weight, bias)
    x2d = x.reshape(-1, k).contiguous()
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
    if target == "auto":
        out = _auto_sas(x2d, weight, bias, M, chosen)
    else:
        out = _kernel_module(chosen).sas_gemm(x2d, weight, bias, M)
    return out.reshape(*x.shape[:-1], n)


def sas_kernel_blockers(x: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, rule: str) -> list:
    """Why the SAS kernels cannot compute this product (an empty list when they can)."""
    blockers = _common_blockers(x, weight, bias)
    if M not in _KERNEL_M:
        blockers.append(f"M = {M} has no kernel (kernels run M = 2 and 4)")
    if rule != _KERNEL_RULE:
        blockers.append(f"index rule {rule!r} has no kernel (kernels compute {_KERNEL_RULE!r})")
    return blockers


def _rows_bucket(rows: int) -> int:
    """Shape bucket of the row count: the next power of two (at least 16)."""
    return max(16, 1 << max(0, rows - 1).bit_length())


def vendor_24_status(x: Tensor) -> tuple:
    """(True, backend) when PyTorch's 2:4 kernels can run for x's device and dtype, else (False, why)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False, f"PyTorch's 2:4 kernels take float16/bfloat16, not {x.dtype}"
    if not x.is_cuda:
        return False, "PyTorch's 2:4 kernels need a CUDA device"
    major, minor = torch.cuda.get_device_capability(x.device)
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        return True, "cuSPARSELt"
    if major == 8:
        return True, "CUTLASS"
    return False, f"no 2:4 backend for sm_{major}{minor}: cuSPARSELt is unavailable and CUTLASS needs 8.x"


def _vendor_sas(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], M: int) -> Tensor:
    """Projection, compression of S(x) by PyTorch, then its 2:4 GEMM (cuSPARSELt or CUTLASS)."""
    from torch.sparse import to_sparse_semi_structured

    out = torch.mm(to_sparse_semi_structured(project(x2d, M)), weight.t())
    return out if bias is None else out + bias


def sas_linear_choice(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, kernel_target: str = "cuda"):
    """``(decision, candidates)`` of ``target="auto"`` for the SAS product of these operands.

    ``decision.impl`` names the candidate that runs: ``"dense"`` (projection + cuBLAS, the
    PyTorch formulation), ``"fused"`` (the Sparse Tensor Core kernel) or ``"sparse24"``
    (projection + PyTorch's 2:4 kernels).
    """
    kernels = _kernel_module(kernel_target)
    candidates = {
        autotune.REFERENCE: lambda: F.linear(project(x2d, M), weight, bias),
        "fused": lambda: kernels.sas_gemm(x2d, weight, bias, M),
    }
    rejected = {}
    ok, why = vendor_24_status(x2d)
    if ok:
        candidates["sparse24"] = lambda: _vendor_sas(x2d, weight, bias, M)
    else:
        rejected["sparse24"] = why
    fields = {"target": kernel_target, "dtype": str(x2d.dtype).replace("torch.", ""), "M": M,
              "K": x2d.shape[1], "N": weight.shape[0], "rows": _rows_bucket(x2d.shape[0]),
              "bias": bias is not None}
    return autotune.choose("sas_linear", fields, candidates, x2d.device, rejected), candidates


def _auto_sas(x2d: Tensor, weight: Tensor, bias: Optional[Tensor], M: int, kernel_target: str) -> Tensor:
    decision, candidates = sas_linear_choice(x2d, weight, bias, M, kernel_target)
    return candidates[decision.impl]()


def _cached_on(packed: PackedSparseWeight, name: str, make):
    """A tensor derived from ``packed``, kept on it until its values or metadata change."""
    version = (packed.values._version, packed.meta._version, packed.values.data_ptr())
    cache = packed.__dict__.setdefault("_derived", {})
    hit = cache.get(name)
    if hit is None or hit[0] != version:
        hit = cache[name] = (version, make())
    return hit[1]


def _auto_sws(x2d: Tensor, packed: PackedSparseWeight, bias: Optional[Tensor], kernel_target: str) -> Tensor:
    kernels = _kernel_module(kernel_target)
    dense = lambda: _cached_on(packed, "dense", lambda: unpack_sws_weight(packed))  # noqa: E731
    candidates = {
        autotune.REFERENCE: lambda: F.linear(x2d, dense(), bias),
        "kernel": lambda: kernels.sws_gemm(x2d, packed, bias),
    }
    rejected = {}
    ok, why = vendor_24_status(x2d)
    if ok:
        from torch.sparse import to_sparse_semi_structured

        vendor = lambda: _cached_on(packed, "sparse24", lambda: to_sparse_semi_structured(dense()))  # noqa: E731
        candidates["sparse24"] = lambda: F.linear(x2d, vendor(), bias)
    else:
        rejected["sparse24"] = why
    fields = {"target": kernel_target, "dtype": str(x2d.dtype).replace("torch.", ""), "M": packed.M,
              "K": packed.shape[1], "N": packed.shape[0], "rows": _rows_bucket(x2d.shape[0]),
              "bias": bias is not None}
    decision = autotune.choose("sws_linear", fields, candidates, x2d.device, rejected)
    return candidates[decision.impl]()


def sws_matmul(
    x: Tensor,
    packed_weight: PackedSparseWeight,
    bias: Optional[Tensor] = None,
    *,
    target: str = "auto",
) -> Tensor:
    """``F.linear(x, W, bias)`` for a 1:M weight ``W`` packed by ``runtime.packing.pack_sws_weight``.

    ``x``: (..., K); ``packed_weight.shape`` = (N, K); ``bias``: (N,) or None. Returns
    (..., N) in x's dtype. Targets as for :func:`sas_matmul`.
    """
    op = "sws_matmul"
    _check_target(op, target)
    _check_tensor(op, "x", x)
    if not isinstance(packed_weight, PackedSparseWeight):
        raise TypeError(
            f"{op}: packed_weight must be a PackedSparseWeight (from "
            f"runtime.packing.pack_sws_weight), got {type(packed_weight).__name__}"
        )
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension (..., K), got a scalar")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be floating point, got {x.dtype}")
    n, k = packed_weight.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"{op}: x has K = {x.shape[-1]} input features but packed_weight has shape "
            f"{(n, k)} (N, K)"
        )
    _check_like(op, "packed_weight.values", packed_weight.values, x)
    if packed_weight.meta.device != x.device:
        raise ValueError(
            f"{op}: packed_weight.meta is on {packed_weight.meta.device} but x is on {x.device}; "
            "use packed_weight.to(device)"
        )
    _check_bias(op, bias, x, n)

    blockers = _common_blockers(x, packed_weight.values, bias)
    chosen = _resolve(op, target, x, blockers)
    if chosen == "cpu":
        return F.linear(x, unpack_sws_weight(packed_weight), bias)
    x2d = x.reshape(-1, k).contiguous()
    bias = None if bias is None else bias.contiguous()
    if target == "auto":
        out = _auto_sws(x2d, packed_weight, bias, chosen)
    else:
        out = _kernel_module(chosen).sws_gemm(x2d, packed_weight, bias)
    return out.reshape(*x.shape[:-1], n)
