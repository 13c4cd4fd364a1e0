"""The GEMM entry points of the runtime: ``sas_matmul`` and ``sws_matmul``.

Why this module exists: the rewritten model calls these without knowing where they run. They
check the user's arguments once, pick a target (``runtime/execution_targets.py``: ``"torch"``, the
PyTorch formulation on any device; ``"cuda"``, the Sparse Tensor Core kernels; ``"emulator"``,
the kernels' source on the host) and run it:

* ``target="auto"``: on CUDA tensors, the fastest correct implementation among the kernel,
  the PyTorch formulation (projection + cuBLAS) and projection + PyTorch's vendor 2:4 kernels
  (cuSPARSELt / CUTLASS), measured once per shape bucket and cached on disk
  (``runtime/autotune.py``; ``SAS_COMPILE_GEMM`` forces one); the PyTorch formulation elsewhere.
* an explicit target runs there, or raises when it is not available on this machine.

Whenever a kernel target cannot take a call (M not in {2, 4}, a dtype the kernels lack, a
custom index rule, inputs that need autograd, an empty input), the call runs on the PyTorch
formulation and the reason is logged on logger ``sas_compile.runtime``.

Precision follows PyTorch's convention for float32: the kernels multiply float32 operands
as tf32 (10 mantissa bits), so they take float32 only where PyTorch itself would use tf32 for
a float32 matmul (``torch.backends.cuda.matmul.allow_tf32`` on, or
``torch.set_float32_matmul_precision("high" | "medium")``); by default a float32 call runs the
full-precision PyTorch formulation, as a dense float32 model would.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import autotune
from .packing import PackedSparseWeight, unpack_sws_weight
from .projection import check_M, get_rule, project
from .execution_targets import TargetStatus, get_target, targets, tf32_allowed

__all__ = ["sas_matmul", "sws_matmul", "targets", "tf32_allowed", "select_target", "sas_linear_choice",
           "vendor_24_status", "TargetStatus", "TARGETS"]

logger = logging.getLogger("sas_compile.runtime")

TARGETS = ("auto", "torch", "cuda", "emulator", "cpu")


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


def select_target(op: str, target: str, x: Tensor, *others: Optional[Tensor], M: Optional[int] = None,
                  rule: Optional[str] = None):
    """The target that computes this call: ``target`` itself, or the PyTorch formulation when a
    kernel target cannot take the call (reason logged). An explicit target that is not
    available here, or is given tensors of the wrong device, raises."""
    if target in ("torch", "cpu"):
        return get_target("torch")
    if target == "auto":
        if not x.is_cuda:
            return get_target("torch")
        chosen = get_target("cuda")
        status = chosen.status()
        if not status.available:
            logger.info("%s: running the PyTorch formulation on CUDA tensors: cuda target unavailable (%s)",
                        op, status.reason)
            return get_target("torch")
    else:
        chosen = get_target(target)
        if chosen.device_type == "cuda" and not x.is_cuda:
            raise ValueError(f"{op}: target='cuda' needs CUDA tensors, x is on {x.device}; use target='auto' or 'torch'")
        if chosen.device_type == "cpu" and x.device.type != "cpu":
            raise ValueError(f"{op}: target={target!r} runs on CPU tensors, x is on {x.device}; move x to the CPU")
        status = chosen.status()
        if not status.available:
            raise RuntimeError(f"{op}: target={target!r} is not available on this machine: {status.reason}")
    reasons = chosen.check("sas_linear" if op.startswith("sas") else "sws_linear", x, *others, M=M, rule=rule)
    if reasons:
        logger.info("%s: target %r falls back to the PyTorch formulation: %s", op, chosen.name, "; ".join(reasons))
        return get_target("torch")
    return chosen


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
    in x's dtype. ``target``: "auto" | "torch" | "cuda" | "emulator" (see the module docstring);
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

    chosen = select_target(op, target, x, weight, bias, M=M, rule=rule)
    if chosen.name == "torch":
        return chosen.sas_linear(x, weight, bias, M, rule)
    if target == "auto":
        x2d = x.reshape(-1, k).contiguous()
        out = _auto_sas(x2d, weight.contiguous(), None if bias is None else bias.contiguous(), M, chosen.name)
        return out.reshape(*x.shape[:-1], n)
    return chosen.sas_linear(x, weight, bias, M, rule)


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
    kernels = get_target(kernel_target).module()
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
    kernels = get_target(kernel_target).module()
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

    chosen = select_target(op, target, x, packed_weight.values, bias)
    if chosen.name == "torch" or target != "auto":
        return chosen.sws_linear(x, packed_weight, bias)
    x2d = x.reshape(-1, k).contiguous()
    out = _auto_sws(x2d, packed_weight, None if bias is None else bias.contiguous(), chosen.name)
    return out.reshape(*x.shape[:-1], n)
