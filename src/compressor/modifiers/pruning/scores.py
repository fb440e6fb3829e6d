"""Importance scores and the masks they select.

- ``l1``: the magnitude of each weight, summed over a unit (row, head group, channel).
- ``activation``: |W| times the L2 norm of the weight's input feature over calibration data,
  from Sun et al., "A Simple and Effective Pruning Approach for Large Language Models"
  (Wanda, 2023, arXiv:2306.11695).
- ``topk``: learnable scores binarized to the top-k with a straight-through estimator, as in
  Sanh et al., "Movement Pruning" (2020, arXiv:2005.07683).
"""

from __future__ import annotations

import torch

__all__ = [
    "activation_scores",
    "binarize_topk",
    "input_square_sums",
    "magnitude_scores",
    "nm_mask",
    "topk_mask",
    "unit_scores",
]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32, detached."""
    return weight.detach().abs().float()


def activation_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W| times the L2 norm of each input feature (dim 1 of a Linear or Conv weight).

    :param weight: a ``(out, in, ...)`` weight
    :param input_sq_sum: ``(in,)`` sums of squared inputs over the calibration data
    """
    if input_sq_sum.shape != (weight.shape[1],):
        raise ValueError(
            f"input statistics have shape {tuple(input_sq_sum.shape)}, expected ({weight.shape[1]},)"
        )
    norm = input_sq_sum.float().sqrt().view(1, -1, *([1] * (weight.dim() - 2)))
    return magnitude_scores(weight) * norm.to(weight.device)


def input_square_sums(inputs: torch.Tensor, conv: bool = False) -> torch.Tensor:
    """Sums of squared inputs per input feature, in float32: the statistics of
    ``activation_scores``, summed over batches by the caller.

    :param inputs: a Linear's ``(..., in)`` input, or a convolution's ``(batch, in, ...)``
    :param conv: the input is a convolution's (features along dim 1)
    """
    x = inputs.detach().float()
    if conv:
        return x.transpose(0, 1).reshape(x.shape[1], -1).pow(2).sum(dim=1)
    return x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0)


def unit_scores(scores: torch.Tensor, dim: int, n_units: int) -> torch.Tensor:
    """Sum per-weight scores into ``n_units`` contiguous units along ``dim``.

    :raises ValueError: when ``n_units`` does not divide the size along ``dim``
    """
    size = scores.shape[dim]
    if size % n_units:
        raise ValueError(f"{n_units} units do not divide a dimension of size {size}")
    return scores.movedim(dim, 0).reshape(n_units, -1).sum(dim=1)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask of ``scores``' shape that keeps its ``k`` largest entries."""
    flat = scores.detach().reshape(-1)
    if not 0 < k <= flat.numel():
        raise ValueError(f"k must be in [1, {flat.numel()}], got {k}")
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive weights along the input dimension.

    A weight of shape ``(out, in, ...)`` is grouped along its flattened input dimension, the
    layout that sparse tensor cores accelerate for 2:4.

    :raises ValueError: when ``m`` does not divide the flattened input dimension
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < N <= M, got {n}:{m}")
    rows = scores.detach().reshape(scores.shape[0], -1)
    if rows.shape[1] % m:
        raise ValueError(
            f"{n}:{m} sparsity needs an input dimension divisible by {m}; the weight has "
            f"{rows.shape[1]} inputs per output"
        )
    runs = rows.reshape(-1, m)
    keep = torch.topk(runs, n, dim=1, sorted=False).indices
    mask = torch.zeros_like(runs, dtype=torch.bool).scatter_(1, keep, True)
    return mask.view_as(scores)


class _StraightThroughMask(torch.autograd.Function):
    """Forward: the given 0/1 mask exactly. Backward: the gradient passes to the scores."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return mask.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def binarize_topk(scores: torch.Tensor, k: int, n_m: tuple[int, int] | None = None) -> torch.Tensor:
    """0/1 values keeping the top ``k`` scores (or the top N of every M), differentiable
    through a straight-through estimator so the scores train with the model."""
    mask = topk_mask(scores, k) if n_m is None else nm_mask(scores, *n_m)
    return _StraightThroughMask.apply(scores, mask)
