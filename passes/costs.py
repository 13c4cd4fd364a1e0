"""Mult and parameter formulas: the one table every count in sas-compile comes from.

Why a pass-level module: the analysis passes (the SWS width decision), the rewrite checks,
``report``, ``inspect`` and SWAT accounting all count with the same formulas; keeping them
below the user API lets every layer of the package use them without importing upwards.
"""
from __future__ import annotations

import math

__all__ = ["round_half_up", "sws_width"]


def round_half_up(x: float) -> int:
    """Round to the nearest int, halves up.

    Python's ``round`` is banker's rounding (``round(2.5) == 2``); the paper's widths use
    ordinary rounding, so we use ``floor(x + 0.5)``.
    """
    return int(math.floor(x + 0.5))


def sws_width(channels: int, M: int) -> int:
    """SWS width of a hidden tensor with ``channels`` channels: ``round(sqrt(M) * channels)``."""
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels={channels!r} must be a positive int")
    return round_half_up(math.sqrt(M) * channels)
