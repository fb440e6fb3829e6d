"""Giving parameters that modifiers add (TopK scores, learnable rotations) to an optimizer
that was created before them, and to its learning-rate schedule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["add_param_group"]


def add_param_group(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    lr_scheduler: Any = None,
    weight_decay: float = 0.0,
) -> dict[str, Any] | None:
    """Add ``params`` to ``optimizer`` as a new group with the first group's settings.

    The group gets no weight decay by default (scores and rotations are not weights to
    shrink). A torch learning-rate scheduler built before the group is extended so that it
    schedules the new group like the first one.

    :param optimizer: a torch optimizer (or one wrapping it, as accelerate's does)
    :param params: the new parameters; those the optimizer already holds are skipped
    :param lr_scheduler: the scheduler driving ``optimizer``, if any
    :param weight_decay: weight decay for the new group, where the optimizer has one
    :return: the group added, or None when nothing was new
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    fresh = [p for p in params if id(p) not in held]
    if not fresh:
        return None
    first = optimizer.param_groups[0]
    group = {k: v for k, v in first.items() if k not in ("params", "initial_lr")}
    if "weight_decay" in group:
        group["weight_decay"] = weight_decay
    base_lr = first.get("initial_lr", first["lr"])
    if "initial_lr" in first:
        group["initial_lr"] = base_lr
    group["params"] = fresh
    optimizer.add_param_group(group)
    if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
        lr_scheduler.base_lrs.append(base_lr)
        if hasattr(lr_scheduler, "lr_lambdas"):
            lr_scheduler.lr_lambdas.append(lr_scheduler.lr_lambdas[0])
        if hasattr(lr_scheduler, "_last_lr"):
            lr_scheduler._last_lr.append(group["lr"])
    return optimizer.param_groups[-1]
