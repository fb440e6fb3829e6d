"""Holding masks on parameters through training.

Two mechanisms, both torch-native:

- hard masks (``MaskHolder``): the pruned entries of a weight are set to zero, a hook zeroes
  their accumulated gradients (after every micro-batch of gradient accumulation, before any
  clipping), and after each optimizer step they are zeroed again (momentum and weight decay
  cannot revive them);
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
from compressor.utils.parametrize import register_parametrization, remove_parametrizations
from compressor.utils.sharding import local_part, local_view

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

    Each mask is kept as 0/1 factors in its parameter's dtype: an in-place multiply by a
    same-dtype tensor is several times faster than by a boolean mask (no type promotion),
    at the cost of the mask taking as much memory as its weight. The gradient is masked in
    place once it has been accumulated into ``.grad`` (so before gradient clipping and before
    DDP reduces it), and ``reapply`` zeroes every masked weight in one ``_foreach_mul_``.

    Given the optimizer, ``reapply`` also sets the second-moment estimates of the pruned
    entries (Adam's ``exp_avg_sq``, ``max_exp_avg_sq``) to 1, once per mask: their gradients
    are always zero, so they would decay to exactly zero, and the square root the optimizer
    takes of them every step is an order of magnitude slower on zeros than on normal numbers
    on CPU (it made a 50% sparse model's Adam step ~18% slower). Adam's update is elementwise
    and those weights are zeroed after each step, so no kept weight sees the difference.

    A tensor-parallel (DTensor) parameter is masked on this rank's slice: its mask is the
    slice of the whole mask (the same on every rank) that this rank holds.

    :param owner: the modifier whose hook registry holds the gradient hooks
    :param mask_gradients: False leaves gradients and optimizer state alone and only zeroes
        the weights (now and after every step), for a method that prunes as DeepSpeed's
        ``snip_momentum`` does (its clipping and optimizer state see every gradient)
    """

    def __init__(self, owner: HooksMixin, mask_gradients: bool = True) -> None:
        self._owner = owner
        self._mask_gradients = mask_gradients
        self._masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lists: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._moments_filled: set[int] = set()  # masks whose second moments are set

    def __len__(self) -> int:
        return len(self._masks)

    def set(self, param: torch.Tensor, mask: torch.Tensor) -> None:
        """Mask ``param`` (zeroing it now) and keep it masked from now on.

        :param mask: boolean, of ``param``'s shape or broadcastable to it (the whole mask
            when ``param`` is a DTensor)
        """
        key = id(param)
        factors = mask.to(device=param.device, dtype=torch.bool).to(param.dtype)
        factors = local_view(local_part(factors, param))  # this rank's slice of a DTensor
        if key not in self._masks and param.requires_grad and self._mask_gradients:
            self._owner.register_hook(param, self._grad_hook(key), "accumulated_grad")
        self._masks[key] = (param, factors)
        self._lists = None
        self._moments_filled.discard(key)
        with torch.no_grad():
            local_view(param).mul_(factors)

    def mask_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The boolean mask held on ``param`` (None when it has none)."""
        entry = self._masks.get(id(param))
        return None if entry is None else entry[1] != 0

    def _grad_hook(self, key: int):
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:
                local_view(param.grad).mul_(self._masks[key][1])

        return hook

    @torch.no_grad()
    def reapply(self, optimizer: Any = None) -> None:
        """Zero every masked entry again (after an optimizer step).

        :param optimizer: the optimizer that stepped, whose pruned second moments are set
            to 1 once its state exists (see the class docstring); None leaves it alone
        """
        if not self._masks:
            return
        if self._lists is None:
            params, factors = zip(*self._masks.values(), strict=True)
            self._lists = [local_view(p) for p in params], list(factors)
        torch._foreach_mul_(*self._lists)
        if not self._mask_gradients:
            return
        if optimizer is not None and len(self._moments_filled) < len(self._masks):
            self._fill_second_moments(optimizer)

    def _fill_second_moments(self, optimizer: Any) -> None:
        states = getattr(optimizer, "state", None)
        if states is None:
            return
        for key, (param, factors) in self._masks.items():
            state = states.get(param) if key not in self._moments_filled else None
            if not state:  # filled already, or no step has created the state yet
                continue
            pruned = factors == 0
            for name in _SECOND_MOMENTS:
                moment = state.get(name)
                if isinstance(moment, torch.Tensor) and moment.shape == param.shape:
                    local_view(moment).masked_fill_(pruned, 1.0)
            self._moments_filled.add(key)

    def clear(self) -> None:
        self._masks.clear()
        self._lists = None
        self._moments_filled.clear()


_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


class ScoreMask(torch.nn.Module):
    """Parametrization ``weight * binarize(scores)``; units expand along ``dim`` when the
    scores are per unit.

    :param scores: the learnable scores (shared by every member of a structured coupling)
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
            remove_parametrizations(self.module, self.name, leave_parametrized=True)


def add_score_mask(
    module: torch.nn.Module, name: str, score_mask: ScoreMask, where: str = ""
) -> Any:
    """Parametrize ``module.<name>`` with ``score_mask``; returns a removable handle.

    :param where: the module's name, for errors
    """
    register_parametrization(module, name, score_mask, where=where)
    return ParametrizationHandle(module, name)
