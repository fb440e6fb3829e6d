"""OWL: non-uniform layer sparsities, more sparsity where outliers are fewer.

OWL (Yin et al., 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for
Pruning LLMs to High Sparsity") measures each layer's outlier ratio: the fraction of its
Wanda scores ``|W_ij| * ||X_j||`` (over every pruned Linear of the layer) above ``m`` times
their mean. Layers with more outliers keep more weights: the ratios, rescaled to ``[0, 2
lambda]``, are subtracted from the target sparsity around their mean, so the model's total
sparsity stays the target.

The ratios come from one dense pass of the calibration data, before any layer is pruned
(``dense_square_sums``), so that the layers are then pruned one at a time, each calibrated on
the outputs of the pruned layers before it, as with a uniform sparsity.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["dense_square_sums", "outlier_ratio", "owl_layer_sparsities"]


@torch.no_grad()
def dense_square_sums(
    model: torch.nn.Module,
    linears: Mapping[str, torch.nn.Module],
    batches: Iterable[Mapping[str, Any]],
) -> dict[str, torch.Tensor]:
    """Each Linear's sum of its input features' squares (``(in_features,)``, float32) over
    every batch run through ``model`` as it is (dense): the squared input norms OWL's scores
    ``|W| * ||x||`` need. A Linear no batch reaches is absent. The model runs on the device of
    its first parameter, in eval mode, its training mode restored after."""
    sums: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            square = x.square().sum(dim=0)
            sums[name] = square if name not in sums else sums[name].add_(square)

        return hook

    device = next(iter(model.parameters())).device
    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(list(batches), desc="OWL dense pass"):
            model(
                **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sums


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
