"""Refusing NaN or infinite weights before a modifier works on them.

A NaN or inf weight silently spreads: it wins or loses every magnitude comparison (pruning),
turns a whole rotated matrix into NaN (SpinQuant), and makes every hidden state after it NaN
(layer reduction's angles, GPTQ's Hessians). Modifiers check the weights they will read at
initialize, naming the first bad one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["check_finite_weights"]

_CHUNK_ELEMENTS = 1 << 20
"""Elements checked at a time: ``torch.isfinite`` on a whole weight holds temporaries of
about twice its size (an absolute value and three masks), 190 MB for SmolLM2-135M's
embedding, which raised GPTQ's peak memory at initialize above the rest of its run
(bench/results/2026-12-02-w8a8-peak.md)."""


def _all_finite(value: torch.Tensor) -> bool:
    """Whether every entry of ``value`` is finite, checked a slice of rows at a time."""
    if value.dim() == 0:
        return bool(torch.isfinite(value))
    rows = max(1, _CHUNK_ELEMENTS // max(1, value[0].numel()))
    return all(bool(torch.isfinite(part).all()) for part in value.split(rows))


@torch.no_grad()
def check_finite_weights(
    modules: Iterable[tuple[str, torch.nn.Module]],
    who: str,
    attributes: tuple[str, ...] | None = None,
) -> None:
    """Raise when a floating-point parameter of one of ``modules`` holds NaN or inf.

    Parameters that are not in memory (on the ``meta`` device, as offloaded weights are) are
    skipped; a module's own parameters are checked, not its children's.

    :param modules: ``(name, module)`` pairs, e.g. ``model.named_modules()``
    :param who: the modifier checking, for the message
    :param attributes: check only parameters of these names (e.g. ``("weight",)``); every
        parameter when None
    :raises ValueError: naming the parameter and how many entries are NaN and inf
    """
    for name, module in modules:
        for attribute, value in module.named_parameters(recurse=False):
            if attributes is not None and attribute not in attributes:
                continue
            if not value.is_floating_point() or value.is_meta:
                continue
            if _all_finite(value):
                continue
            nans = int(torch.isnan(value).sum())
            infs = int(torch.isinf(value).sum())
            where = f"{name}.{attribute}" if name else attribute
            raise ValueError(
                f"{who}: {where} holds {nans} NaN and {infs} infinite value(s) of "
                f"{value.numel()}; compressing it would give wrong results silently. Fix the "
                "model's weights first (reload the checkpoint; check the training run that "
                "produced it)"
            )
