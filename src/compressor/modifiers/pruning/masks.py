"""Holding masks on parameters through training.

Two mechanisms, both torch-native:

- hard masks (``MaskHolder``): the pruned entries of a weight are set to zero, a gradient hook
  zeroes their gradients (so every micro-batch of gradient accumulation is masked), and after
  each optimizer step they are zeroed again (momentum and weight decay cannot revive them);
- learnable masks (``ScoreMask``): a ``torch.nn.utils.parametrize`` parametrization that
  multiplies the weight by the straight-through binarized top-k of a score tensor, so that
  ``module.weight`` is exactly zero where pruned while the scores still receive gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils import parametrize

from compressor.modifiers.hooks import HooksMixin
from compressor.modifiers.pruning.scores import binarize_topk

__all__ = ["MaskHolder", "ParametrizationHandle", "ScoreMask", "expand_unit_mask"]


def expand_unit_mask(unit_mask: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """Broadcast a per-unit mask to a tensor of ``shape`` along ``dim`` (contiguous units)."""
    size = shape[dim]
    n_units = unit_mask.numel()
    if size % n_units:
        raise ValueError(f"{n_units} units do not divide a dimension of size {size}")
    view = [1] * len(shape)
    view[dim] = size
    return unit_mask.repeat_interleave(size // n_units).view(view)


class MaskHolder:
    """Keeps parameters zero where their mask is zero, for the life of ``owner``'s hooks.

    :param owner: the modifier whose hook registry holds the gradient hooks
    """

    def __init__(self, owner: HooksMixin) -> None:
        self._owner = owner
        self._masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._masks)

    def set(self, param: torch.Tensor, mask: torch.Tensor) -> None:
        """Mask ``param`` (zeroing it now) and keep it masked from now on."""
        key = id(param)
        mask = mask.to(device=param.device, dtype=torch.bool)
        if key not in self._masks and param.requires_grad:
            self._owner.register_hook(param, self._grad_hook(key), "tensor")
        self._masks[key] = (param, mask)
        with torch.no_grad():
            param.mul_(mask)

    def mask_of(self, param: torch.Tensor) -> torch.Tensor | None:
        entry = self._masks.get(id(param))
        return None if entry is None else entry[1]

    def _grad_hook(self, key: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * self._masks[key][1]

        return hook

    @torch.no_grad()
    def reapply(self) -> None:
        """Zero every masked entry again (after an optimizer step)."""
        for param, mask in self._masks.values():
            param.mul_(mask)

    def clear(self) -> None:
        self._masks.clear()


class ScoreMask(torch.nn.Module):
    """Parametrization ``weight * binarize(scores)``; units expand along ``dim`` when the
    scores are per unit.

    :param scores: the learnable scores (shared by every member of a structured group)
    :param dim: the dimension units run along, or None for per-entry scores
    :param n_m: keep the top N of every M instead of the top ``keep``
    """

    def __init__(
        self, scores: torch.nn.Parameter, dim: int | None, n_m: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.scores = scores
        self.dim = dim
        self.n_m = n_m
        self.keep = scores.numel()

    def binary(self) -> torch.Tensor:
        return binarize_topk(self.scores, self.keep, self.n_m)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.binary()
        if self.dim is not None:
            mask = expand_unit_mask(mask, weight.shape, self.dim)
        return weight * mask.to(weight.dtype)


class ParametrizationHandle:
    """A removable handle for a parametrization: removal keeps the masked value and puts the
    original parameter object back (so optimizers keep their reference)."""

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        self.module = module
        self.name = name

    def remove(self) -> None:
        if parametrize.is_parametrized(self.module, self.name):
            parametrize.remove_parametrizations(self.module, self.name, leave_parametrized=True)


def add_score_mask(module: torch.nn.Module, name: str, score_mask: ScoreMask) -> Any:
    """Parametrize ``module.<name>`` with ``score_mask``; returns a removable handle."""
    parametrize.register_parametrization(module, name, score_mask)
    return ParametrizationHandle(module, name)
