"""Mult and parameter formulas: the one table every count in sas-compile comes from.

Why a pass-level module: the analysis passes (the SWS width decision), the rewrite checks,
``report``, ``inspect`` and SWAT accounting all count with the same formulas; keeping them
below the user API lets every layer of the package use them without importing upwards.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

__all__ = ["round_half_up", "sws_width", "SWSLayerShape", "sws_layer_shape"]


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


class SWSLayerShape(NamedTuple):
    """Widths of one SWS conv/linear: channels in and out, groups, and weights per output."""

    in_channels: int
    out_channels: int
    groups: int
    fan_in: int  # in_channels / groups * kernel: the row length of the 1:M weight


def sws_layer_shape(
    in_channels: int,
    out_channels: int,
    M: int,
    *,
    groups: int = 1,
    kernel: int = 1,
    widen_in: bool = True,
    widen_out: bool = True,
    in_width: Optional[int] = None,
    out_width: Optional[int] = None,
) -> SWSLayerShape:
    """The one SWS rule for a single conv/linear (``kernel`` = product of its kernel sizes).

    Standalone (no ``in_width``/``out_width``), each width widens to ``sws_width(C, M)`` per
    group, ``groups * sws_width(C / groups, M)``, so a grouped conv keeps its group count;
    ``widen_in=False`` / ``widen_out=False`` keep a network input / final output at its size. A
    depthwise conv (``groups == in == out``) stays depthwise: one width ``sws_width(C, M)`` when
    both sides widen, else it stays whole.

    In a whole graph a width is shared by every layer that touches it, so the analysis
    decides it once (``sws_width`` of the tied width group, or the size when it must stay) and
    passes it as ``in_width``/``out_width``; the rule then gives the layer's groups and fan-in:
    a conv with one input channel per group (``groups == in_channels``) keeps that, its groups
    follow the new width. ``fan_in = in / groups * kernel`` either way.
    """
    if (in_width is None) != (out_width is None):
        raise ValueError("sws_layer_shape: give both in_width and out_width, or neither")
    if in_width is not None:
        cin, cout = in_width, out_width
        depthwise = groups > 1 and groups == in_channels
        g = cin if depthwise else groups
    elif groups > 1 and groups == in_channels == out_channels:
        cin = cout = g = sws_width(in_channels, M) if (widen_in and widen_out) else in_channels
    else:
        cin = groups * sws_width(in_channels // groups, M) if widen_in else in_channels
        cout = groups * sws_width(out_channels // groups, M) if widen_out else out_channels
        g = groups
    return SWSLayerShape(cin, cout, g, cin // g * kernel)
