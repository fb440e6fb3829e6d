"""QuantizationModifier's training options (progressive bits, low-bit weights, the
full-precision blend, ``activation_start``), checked together and against the scheme when a
recipe is parsed."""

from __future__ import annotations

from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy

__all__ = ["check_training_options"]


def check_training_options(
    *,
    config: QuantizationConfig,
    start: float | None,
    end: float | None,
    activation_start: float | None,
    rounding: str,
    start_bits: int | None,
    target_bits: int | None,
    quantization_period: int | None,
    low_bit_weights: str | None,
    weight_blend_rate: float | None,
) -> None:
    """Raise ValueError for training options that do not fit together or the scheme."""
    progressive = (start_bits, target_bits, quantization_period)
    if any(v is not None for v in progressive) and any(v is None for v in progressive):
        raise ValueError(
            "progressive bit reduction needs start_bits, target_bits and "
            f"quantization_period together; got start_bits={start_bits}, "
            f"target_bits={target_bits}, quantization_period={quantization_period}"
        )
    training_only = []
    if rounding == "stochastic":
        training_only.append("rounding='stochastic'")
    if start_bits is not None:
        training_only.append("progressive bit reduction")
        assert target_bits is not None
        if start_bits <= target_bits:
            raise ValueError(f"start_bits={start_bits} must exceed target_bits={target_bits}")
        for name, group in config.config_groups.items():
            bits = group.weights.num_bits if group.weights is not None else None  # type: ignore[union-attr]
            if bits != target_bits:
                raise ValueError(
                    f"target_bits={target_bits} must equal the weights' num_bits of "
                    f"every config group; {name} has {bits}"
                )
    if low_bit_weights is not None:
        training_only.append(f"low_bit_weights={low_bit_weights!r}")
        if rounding == "stochastic" or start_bits is not None:
            raise ValueError(
                "low_bit_weights rounds to nearest at a fixed level set; it cannot be "
                "combined with rounding='stochastic' or progressive bit reduction"
            )
        for name, group in config.config_groups.items():
            w = group.weights  # type: ignore[union-attr]
            fits = (
                w is not None
                and w.type == "int"
                and w.num_bits == 2
                and w.symmetric
                and QuantizationStrategy(w.strategy)
                in (QuantizationStrategy.CHANNEL, QuantizationStrategy.TENSOR)
            )
            if not fits:
                raise ValueError(
                    f"low_bit_weights={low_bit_weights!r} needs int, num_bits 2, "
                    "symmetric weights with strategy 'channel' (alpha per output row) or "
                    f"'tensor' (one alpha); config group {name} has {w}"
                )
    if weight_blend_rate is not None:
        training_only.append(f"weight_blend_rate={weight_blend_rate}")
        if all(g.weights is None for g in config.config_groups.values()):  # type: ignore[union-attr]
            raise ValueError(
                f"weight_blend_rate={weight_blend_rate}: no config group quantizes weights"
            )
    if activation_start is not None:
        training_only.append(f"activation_start={activation_start}")
        _check_activation_start(config, start, end, activation_start)
    if training_only and start is None:
        raise ValueError(
            f"{' and '.join(training_only)} apply to training: set start (for example "
            "start: 0); post-training calibration rounds to nearest at the target bits"
        )


def _check_activation_start(
    config: QuantizationConfig, start: float | None, end: float | None, activation_start: float
) -> None:
    roles = ("input_activations", "output_activations")
    if not any(getattr(g, r) is not None for g in config.config_groups.values() for r in roles):
        raise ValueError(
            f"activation_start={activation_start}: no config group quantizes activations "
            "(input_activations or output_activations)"
        )
    if start is not None and activation_start < start:
        raise ValueError(
            f"activation_start={activation_start} must not come before start={start}: "
            "activations can start later than the weights, not earlier"
        )
    if end is not None and activation_start >= end:
        raise ValueError(
            f"activation_start={activation_start} must come before end={end}, or the "
            "activation ranges are never observed"
        )
