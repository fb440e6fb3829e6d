"""The numeric core of Wanda: prune by |W| times the input norm, within each output row.

Wanda (Sun, Liu, Bair, Kolter, 2024, "A Simple and Effective Pruning Approach for Large
Language Models") scores each weight ``W_ij`` by ``|W_ij| * ||X_j||_2``, the norm of its input
feature over the calibration tokens, and compares the scores *within each output row*: every
row loses the same number of weights (the paper finds this per-output comparison much better
than per-layer for LLMs). N:M groups are chosen the same way inside each row.
"""

from __future__ import annotations

import torch

__all__ = ["accumulate_square_sums", "wanda_mask"]


def accumulate_square_sums(inputs: torch.Tensor, sums: torch.Tensor | None) -> torch.Tensor:
    """Add ``x_j^2`` over every token of ``inputs`` ``(..., features)`` to ``sums``
    (``(features,)``, float32, started when None): the square of each feature's L2 norm."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
    batch = x.square().sum(dim=0)
    return batch if sums is None else sums.add_(batch.to(sums.device))


@torch.no_grad()
def wanda_mask(
    weight: torch.Tensor,
    square_sums: torch.Tensor,
    sparsity: float,
    mask_structure: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Wanda's mask for a ``(rows, columns)`` weight: True where a weight is pruned.

    :param weight: the Linear's weight
    :param square_sums: ``(columns,)`` sum of each input feature's squares over the
        calibration tokens (``accumulate_square_sums``); only its square root's ratios matter
    :param sparsity: the fraction pruned in every row, in [0, 1): ``int(columns * sparsity)``
        weights of least score per row; ignored with ``mask_structure``
    :param mask_structure: None (unstructured) or ``(n, m)``: each row keeps the ``n`` weights
        of greatest score in every ``m`` consecutive inputs
    """
    if weight.dim() != 2 or square_sums.shape != (weight.shape[1],):
        raise ValueError(
            f"Wanda needs a 2-D weight and one norm per input column; got weight "
            f"{tuple(weight.shape)} and norms {tuple(square_sums.shape)}"
        )
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    scores = weight.detach().float().abs() * square_sums.float().sqrt().to(weight.device)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if mask_structure is not None:
        n, m = mask_structure
        if weight.shape[1] % m:
            raise ValueError(f"M={m} does not divide the weight's {weight.shape[1]} input columns")
        groups = scores.unflatten(1, (-1, m))
        smallest = groups.topk(m - n, dim=2, largest=False).indices
        return mask.unflatten(1, (-1, m)).scatter_(2, smallest, True).flatten(1)
    count = int(weight.shape[1] * sparsity)  # as the paper's code (and llm-compressor) count
    if count:
        smallest = scores.topk(count, dim=1, largest=False).indices
        mask.scatter_(1, smallest, True)
    return mask
