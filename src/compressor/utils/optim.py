"""Giving parameters that modifiers add (TopK scores, learnable rotations) to an optimizer
that was created before them, and to its learning-rate schedule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["add_param_group", "extend_lr_scheduler"]


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
    extend_lr_scheduler(optimizer, lr_scheduler)
    return optimizer.param_groups[-1]


def extend_lr_scheduler(optimizer: torch.optim.Optimizer, lr_scheduler: Any) -> int:
    """Make a torch scheduler built before some of ``optimizer``'s groups schedule them too,
    like its first group (torch's schedulers keep one base rate, and one factor function for
    LambdaLR, per group and fail when the counts differ).

    :return: how many groups were added to the schedule
    """
    base_lrs = getattr(lr_scheduler, "base_lrs", None)
    if base_lrs is None:
        return 0
    groups = optimizer.param_groups
    added = 0
    for group in groups[len(base_lrs) :]:
        base_lrs.append(group.setdefault("initial_lr", group["lr"]))
        lambdas = getattr(lr_scheduler, "lr_lambdas", None)
        if lambdas is not None and len(lambdas) < len(base_lrs):
            lambdas.append(lambdas[0])
        last = getattr(lr_scheduler, "_last_lr", None)
        if last is not None and len(last) < len(base_lrs):
            last.append(group["lr"])
        added += 1
    return added
