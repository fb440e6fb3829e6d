"""Density schedules: how much of a layer is kept at each step of a pruning run.

The cubic ramp is the gradual pruning schedule of Zhu & Gupta, "To prune, or not to prune"
(2017, arXiv:1710.01878): pruning is fast while the network has many redundant weights and
slows down as fewer remain.
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["Ramp", "density_at", "kept_count"]

Ramp = Literal["cubic", "linear"]


def density_at(
    index: float,
    *,
    start: float | None,
    end: float | None,
    init_density: float,
    final_density: float,
    ramp: Ramp = "cubic",
) -> float:
    """The fraction of weights (or units) kept at ``index``.

    Before ``start`` it is ``init_density``; from ``end`` on (or always, when ``start`` or
    ``end`` is unset, as in one-shot pruning) it is ``final_density``; in between it follows
    the ramp.

    :param index: the current step (or epoch)
    :param start: where the ramp begins; None means no ramp
    :param end: where the ramp reaches ``final_density``; None means no ramp
    :param init_density: the density at ``start``
    :param final_density: the density at ``end``
    :param ramp: ``cubic`` (fast first, then slower) or ``linear``
    """
    if start is None or end is None or end <= start:
        return final_density
    if index <= start:
        return init_density
    if index >= end:
        return final_density
    progress = (index - start) / (end - start)
    if ramp == "linear":
        return init_density + (final_density - init_density) * progress
    if ramp == "cubic":
        return final_density + (init_density - final_density) * (1.0 - progress) ** 3
    raise ValueError(f"ramp must be 'cubic' or 'linear', got {ramp!r}")


def kept_count(total: int, density: float) -> int:
    """How many of ``total`` weights or units a ``density`` keeps: rounded half up, at least 1."""
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return max(1, min(total, math.floor(density * total + 0.5)))
