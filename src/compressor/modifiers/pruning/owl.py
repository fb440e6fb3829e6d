"""OWL: non-uniform layer sparsities, more sparsity where outliers are fewer.

OWL (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for
Pruning LLMs to High Sparsity") measures each layer's outlier ratio: the fraction of its
Wanda scores ``|W_ij| * ||X_j||`` (over every pruned Linear of the layer) above ``m`` times
their mean. Layers with more outliers keep more weights: the ratios, rescaled to ``[0, 2
lambda]``, are subtracted from the target sparsity around their mean, so the model's total
sparsity stays the target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["outlier_ratio", "owl_layer_sparsities"]


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """The fraction of a layer's scores (every Linear's ``|W| * ||x||``) above ``m`` times
    their mean."""
    flat = torch.cat([s.detach().float().flatten() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_layer_sparsities(
    ratios: Sequence[float], sizes: Sequence[int], sparsity: float, lmbda: float
) -> list[float]:
    """Each layer's sparsity from its outlier ratio.

    The ratios are rescaled to ``[0, 2 * lmbda]`` (min to max); a layer's sparsity is
    ``sparsity - (rescaled - mean)``, the mean weighted by the layers' sizes (their weight
    counts), so that the model's total pruned fraction is ``sparsity`` exactly (with layers of
    equal size, as decoder layers are, the plain mean OWL's code uses).

    :raises ValueError: a layer's sparsity would leave [0, 1): ``lmbda`` too large
    """
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError(f"one size per layer: {len(ratios)} ratios, {len(sizes)} sizes")
    low, high = min(ratios), max(ratios)
    spread = high - low
    scaled = [(r - low) / spread * 2 * lmbda if spread > 0 else 0.0 for r in ratios]
    total = sum(sizes)
    mean = sum(s * n for s, n in zip(scaled, sizes, strict=True)) / total
    result = [sparsity - (s - mean) for s in scaled]
    if any(not 0.0 <= r < 1.0 for r in result):
        raise ValueError(
            f"OWL with owl_lmbda={lmbda} and sparsity={sparsity} gives layer sparsities "
            f"{[round(r, 3) for r in result]}, outside [0, 1); choose a smaller owl_lmbda"
        )
    return result
