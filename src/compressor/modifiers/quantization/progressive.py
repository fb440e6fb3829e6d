"""Progressive bit reduction (DeepSpeed's MoQ schedule) as a pure function of the step."""

from __future__ import annotations

__all__ = ["progressive_bits"]


def progressive_bits(steps: int, start_bits: int, target_bits: int, period: int) -> int:
    """The weight bits after ``steps`` optimizer steps from the start of quantization.

    Weights start at ``start_bits`` and lose one bit each time the period elapses; the
    period doubles after each drop, so drops happen at ``period * (2**k - 1)`` steps,
    until ``target_bits`` (Shen et al., 2021, "Mixture of Quantized Experts",
    DeepSpeed's MoQ).

    :param steps: optimizer steps since the modifier started (negative counts as 0)
    :param start_bits: bits at the start
    :param target_bits: the bits it ends at (fewer than ``start_bits``)
    :param period: steps before the first drop
    """
    if period < 1:
        raise ValueError(f"period must be at least 1 step, got {period}")
    if target_bits > start_bits:
        raise ValueError(f"target_bits={target_bits} exceeds start_bits={start_bits}")
    bits, next_drop, length = start_bits, period, period
    while bits > target_bits and steps >= next_drop:
        bits -= 1
        length *= 2
        next_drop += length
    return bits
