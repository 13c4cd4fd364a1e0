"""The vendor 2:4 paths PyTorch offers on the GPU at hand, for GPU tests to compare against.

PyTorch's CUTLASS 2:4 kernels (``torch._sparse_semi_structured_mm``, ``_FORCE_CUTLASS``) run
only on compute capability 8.x ("Supported only on GPUs with compute capability 8.x"); on
sm_90 the vendor path is cuSPARSELt, which ``to_sparse_semi_structured`` picks by default.
"""
from __future__ import annotations

import pytest
import torch

from sas_compile.runtime.projection import project

CUTLASS_ONLY_REASON = ("PyTorch's CUTLASS 2:4 kernels run only on compute capability 8.x; "
                       "this GPU is sm_{}{}, where the vendor 2:4 path is cuSPARSELt (tested separately)")


def cutlass_24_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 8


def skip_unless_cutlass_24() -> None:
    if not cutlass_24_available():
        pytest.skip(CUTLASS_ONLY_REASON.format(*torch.cuda.get_device_capability()))


def cusparselt_available() -> bool:
    return torch.cuda.is_available() and torch.backends.cusparselt.is_available()


def vendor_sas_product(x: torch.Tensor, weight: torch.Tensor, M: int) -> torch.Tensor:
    """``S(x) @ weight.T`` through PyTorch's default 2:4 backend (cuSPARSELt where present).

    The projected activation is compressed at run time: it is 2:4 for M = 2 and 4.
    """
    from torch.sparse import to_sparse_semi_structured

    return torch.mm(to_sparse_semi_structured(project(x, M)), weight.t().contiguous())
