"""SmoothQuant's per-channel scales (Xiao et al. 2023, arXiv:2211.10438), as pure functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["MINIMUM_SMOOTHING_SCALE", "log_equalization_scales", "smoothquant_scales"]

MINIMUM_SMOOTHING_SCALE = 1e-5
"""Scales never fall below this, so a channel that is always zero divides by no zero."""


def smoothquant_scales(
    activation_range: torch.Tensor, balance_weights: Sequence[torch.Tensor], alpha: float
) -> torch.Tensor:
    """``s_j = a_j ** alpha / w_j ** (1 - alpha)`` for each input channel ``j``.

    ``a_j`` is the activation's observed dynamic range on channel ``j`` (max - min over every
    calibration token, as llm-compressor measures it), ``w_j`` the weights' range on that
    column, ``2 max |W_ij|`` over every balance layer's rows. Dividing the activation by ``s``
    and multiplying the weights' columns by it moves a share ``alpha`` of the activation
    outliers into the weights. A column of zero weights keeps ``s_j = a_j``.

    :param activation_range: ``(channels,)`` max - min of the activation per channel
    :param balance_weights: the ``(rows, channels)`` weights of the linears reading it
    :param alpha: the smoothing strength, in [0, 1]
    :return: ``(channels,)`` scales, at least ``MINIMUM_SMOOTHING_SCALE``
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing strength alpha={alpha} must lie in [0, 1]")
    act = activation_range.detach().double()
    columns = torch.stack([w.detach().abs().amax(dim=0).to(act) for w in balance_weights])
    weight_range = 2.0 * columns.amax(dim=0)
    scales = act.pow(alpha) / weight_range.pow(1.0 - alpha)
    scales = torch.where(weight_range > 0, scales, act)
    return scales.clamp(min=MINIMUM_SMOOTHING_SCALE).float()


def log_equalization_scales(activation_range: torch.Tensor) -> torch.Tensor:
    """``s_j = a_j / log2(2 + a_j)`` for each channel ``j``: logarithmic equalization (Li et
    al. 2023, "FPTQ: Fine-grained Post-Training Quantization for Large Language Models",
    arXiv:2308.15987), as llm-compressor computes it (``SmoothQuantModifier(algorithm:
    log_equalization)``): from the activation's range alone, no weight and no strength.

    :param activation_range: ``(channels,)`` max - min of the activation per channel
    :return: ``(channels,)`` scales, at least ``MINIMUM_SMOOTHING_SCALE``
    """
    act = activation_range.detach().double()
    scales = act / torch.log2(2.0 + act)
    return scales.clamp(min=MINIMUM_SMOOTHING_SCALE).float()
