"""Progressive bit reduction (DeepSpeed's MoQ schedule) and the full-precision blend, as pure
functions of the step."""

from __future__ import annotations

__all__ = ["bit_drop_steps", "full_precision_share", "progressive_bits"]


def bit_drop_steps(start_bits: int, target_bits: int, period: int) -> list[int]:
    """The steps (from the start of quantization) at which the weights lose a bit.

    As in DeepSpeed's code (0.19.6 ``runtime/quantize.py``, ``Quantizer``): it counts
    quantization updates, one of which comes before the first quantized forward, so the
    forward of step ``s`` has seen ``s + 1`` of them (the convention of
    ``full_precision_share``). A bit drops when that count reaches the period, which then
    doubles; the thresholds are absolute, ``period * 2**k`` updates, so the drops are at steps
    ``period * 2**k - 1`` (k = 0, 1, ...), one per bit from ``start_bits`` down to
    ``target_bits``. With ``period`` 1 the first quantized forward is already at
    ``start_bits - 1``, as in DeepSpeed. (Counting each doubled period from the previous
    drop instead, as a reading of "the period doubles after each drop" suggests, would drop
    at ``period * (2**k - 1)``; DeepSpeed's code does not, and we follow the code.)

    :param start_bits: bits at the start
    :param target_bits: the bits it ends at (at most ``start_bits``)
    :param period: updates before the first drop, at least 1
    """
    if period < 1:
        raise ValueError(f"period must be at least 1 step, got {period}")
    if target_bits > start_bits:
        raise ValueError(f"target_bits={target_bits} exceeds start_bits={start_bits}")
    return [period * 2**k - 1 for k in range(start_bits - target_bits)]


def progressive_bits(steps: int, start_bits: int, target_bits: int, period: int) -> int:
    """The weight bits in the forward of step ``steps`` from the start of quantization:
    ``start_bits`` less one for each of ``bit_drop_steps`` reached (Shen et al., 2021,
    "Mixture of Quantized Experts", DeepSpeed's MoQ).

    :param steps: optimizer steps since the modifier started (negative counts as 0)
    :param start_bits: bits at the start
    :param target_bits: the bits it ends at (at most ``start_bits``)
    :param period: updates before the first drop (see ``bit_drop_steps``)
    """
    drops = bit_drop_steps(start_bits, target_bits, period)
    return start_bits - sum(1 for step in drops if step <= max(steps, 0))


def full_precision_share(steps: int, rate: float, drops: list[int] | None = None) -> float:
    """The share ``r`` of the full-precision weight in the forward weight
    ``r * w + (1 - r) * quantize(w)`` after ``steps`` optimizer steps from the start of
    quantization (DeepSpeed's ``fp16_mixed_quantize``, read from its code, 0.19.6
    ``runtime/quantize.py``).

    DeepSpeed lowers ``r`` by ``quantize_change_ratio`` at every quantization update, one of
    which comes before the first quantized forward, so the forward of step ``s`` sees
    ``1 - (s + 1) * rate``. A progressive bit drop puts ``r`` back to 1 for the forward of
    that step, from which it falls again. Differences, on purpose: ``r`` stops at 0 (DeepSpeed
    may step once below 0, weighting the quantized weight by more than 1, before setting 0),
    and it is computed from the step rather than by repeated subtraction, so it reaches 0
    exactly at step ``ceil(1 / rate) - 1``.

    :param steps: optimizer steps since quantization started (negative counts as 0)
    :param rate: how much ``r`` falls per step, in (0, 1]
    :param drops: steps at which the bits drop (``bit_drop_steps``); none by default
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    steps = max(steps, 0)
    last_drop = max((d for d in drops or [] if d <= steps), default=None)
    updates = steps + 1 if last_drop is None else steps - last_drop
    return max(0.0, 1.0 - updates * rate)
