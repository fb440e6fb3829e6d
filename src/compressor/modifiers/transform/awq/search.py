"""AWQ's scale search (Lin et al. 2024, arXiv:2306.00978), as pure functions: the grid, the
candidate scales from activation and weight magnitudes, and the weights as quantized with a
candidate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy

from compressor.modifiers.quantization.fake_quant import fake_quantize_weight

__all__ = [
    "DuoScaling",
    "awq_grid",
    "candidate_scales",
    "quantize_with_scales",
    "weight_means",
]

DuoScaling = bool | Literal["both"]


def awq_grid(n_grid: int, duo_scaling: DuoScaling) -> list[tuple[float, bool]]:
    """The ``(ratio, duo)`` points searched, ratios in [0, 1], as llm-compressor 0.14 walks them.

    - ``duo_scaling=True``: identity first (ratio 0 without weights), then ``n_grid - 1``
      ratios ``i / (n_grid - 2)`` with weight means
    - ``False``: ``n_grid`` ratios ``i / (n_grid - 1)`` on activation means alone
    - ``"both"``: ``n_grid // 2`` ratios, each without then with weight means
    """
    if duo_scaling == "both":
        half = n_grid // 2
        return [(i / (half - 1), duo) for i in range(half) for duo in (False, True)]
    if duo_scaling:
        return [(0.0, False)] + [(i / (n_grid - 2), True) for i in range(n_grid - 1)]
    return [(i / (n_grid - 1), False) for i in range(n_grid)]


def weight_means(weights: Sequence[tuple[torch.Tensor, QuantizationArgs]]) -> torch.Tensor:
    """Per input column, the mean over every balance layer's rows of ``|W|`` normalised by
    the largest ``|W|`` of its quantization chunk (the tensor, the row, or the group): how
    large a column's weights are where the quantization grid sees them.

    :param weights: each balance layer's ``(rows, columns)`` weight with its quantization
        (tensor, channel or group strategy); one column count
    """
    total, rows = None, 0
    for weight, args in weights:
        w = weight.detach().abs().double()
        if args.strategy == QuantizationStrategy.TENSOR:
            chunks = w.reshape(1, -1)
        elif args.strategy == QuantizationStrategy.CHANNEL:
            chunks = w
        elif args.strategy == QuantizationStrategy.GROUP:
            assert args.group_size is not None
            chunks = w.reshape(-1, args.group_size)
        else:
            raise ValueError(
                f"weight strategy {args.strategy!r}: AWQ's weight means need tensor, channel "
                "or group"
            )
        normalised = (chunks / (chunks.amax(dim=1, keepdim=True) + 1e-6)).reshape(w.shape)
        column_sum = normalised.sum(dim=0)
        total = column_sum if total is None else total + column_sum
        rows += w.shape[0]
    if total is None:
        raise ValueError("weight_means needs at least one weight")
    return (total / rows).float()


def candidate_scales(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float, duo: bool
) -> torch.Tensor:
    """``x ** r / w ** (1 - r)`` (duo) or ``x ** r``, clamped at 1e-4 and normalised so that
    ``max * min == 1``; non-finite entries become 1.

    :param x_mean: per-channel mean ``|x|`` of the activations
    :param w_mean: per-channel ``weight_means`` (needed when ``duo``)
    """
    if duo:
        assert w_mean is not None
        scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        scales = x_mean.pow(ratio).clamp(min=1e-4)
    scales = scales / (scales.max() * scales.min()).sqrt()
    return torch.where(torch.isfinite(scales), scales, torch.ones_like(scales))


@torch.no_grad()
def quantize_with_scales(
    weight: torch.Tensor, scales: torch.Tensor, args: QuantizationArgs, where: str
) -> torch.Tensor:
    """``Q(W diag(s)) diag(s)^-1``: the weight as the balance layer computes with it once the
    scales are folded and the scaled weight quantized (scales from its own range), expressed
    on the unscaled inputs."""
    s = scales.to(weight.device, weight.dtype)
    return (fake_quantize_weight(weight * s, args, where=where) / s).to(weight.dtype)
