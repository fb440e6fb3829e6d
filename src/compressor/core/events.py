"""Events that drive the compression lifecycle, and the counters that schedules read."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, fields
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["EventType", "Event"]


class EventType(Enum):
    """Every point of a training or calibration run at which modifiers are called."""

    INITIALIZE = "initialize"
    FINALIZE = "finalize"
    BATCH_START = "batch_start"
    LOSS_CALCULATED = "loss_calculated"
    BATCH_END = "batch_end"
    CALIBRATION_EPOCH_START = "calibration_epoch_start"
    SEQUENTIAL_EPOCH_END = "sequential_epoch_end"
    CALIBRATION_EPOCH_END = "calibration_epoch_end"
    OPTIM_PRE_STEP = "optim_pre_step"
    OPTIM_POST_STEP = "optim_post_step"


@dataclass
class Event:
    """One lifecycle event with the counters a schedule reads.

    Offsets are counted in optimizer steps, or in epochs when ``steps_per_epoch`` is set.

    :param type_: what happened
    :param steps_per_epoch: optimizer steps per epoch; makes the event epoch based
    :param batches_per_step: batches per optimizer step (gradient accumulation)
    :param invocations_per_step: calls of the step function per optimizer step
    :param global_step: optimizer steps taken so far
    :param global_batch: batches seen so far
    :param modules: the modules a SEQUENTIAL_EPOCH_END is about (a decoder layer, a stage's
        modules, the whole model), which the modifiers may compress now; empty for every
        other event. Never copied: they are the model's own modules
    :param batches: the data a run offers modifiers that optimise on it rather than observe
        it through hooks (learned rotations): oneshot's calibration batches on
        CALIBRATION_EPOCH_START, a Trainer's training dataloader on a training run's
        INITIALIZE; empty otherwise. Never copied
    """

    type_: EventType | None = None
    steps_per_epoch: int | None = None
    batches_per_step: int | None = None
    invocations_per_step: int = 1
    global_step: int = 0
    global_batch: int = 0
    modules: tuple[torch.nn.Module, ...] = ()
    batches: Iterable[Any] = ()

    @property
    def epoch_based(self) -> bool:
        return self.steps_per_epoch is not None

    def _require_epochs(self) -> int:
        if self.steps_per_epoch is None:
            raise ValueError("this event is not epoch based: steps_per_epoch is not set")
        if self.steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {self.steps_per_epoch}")
        return self.steps_per_epoch

    @property
    def epoch(self) -> int:
        return self.global_step // self._require_epochs()

    @property
    def epoch_full(self) -> float:
        return self.global_step / self._require_epochs()

    @property
    def epoch_step(self) -> int:
        return self.global_step % self._require_epochs()

    @property
    def epoch_batch(self) -> int:
        steps = self._require_epochs()
        batches_per_epoch = steps * self.batches_per_step if self.batches_per_step else steps
        return self.global_batch % batches_per_epoch

    @property
    def current_index(self) -> float:
        """The position schedules compare offsets with: steps, or epochs when epoch based."""
        return self.epoch_full if self.epoch_based else self.global_step

    @current_index.setter
    def current_index(self, value: float) -> None:
        if self.epoch_based:
            # a step given as a fraction of an epoch (3 / 7 * 7) must not round down
            self.global_step = int(value * self._require_epochs() + 1e-9)
        else:
            self.global_step = int(value)
        if self.batches_per_step is not None and self.batches_per_step >= 2:
            self.global_batch = self.global_step * self.batches_per_step
        else:
            self.global_batch = self.global_step

    def should_update(self, start: float | None, end: float | None, update: float | None) -> bool:
        """Whether a schedule of ``start``/``end``/``update`` offsets fires at this event."""
        current = self.current_index
        if start is not None and current < start:
            return False
        if end is not None and current > end:
            return False
        if update is None or update <= 0:
            return True
        return _is_multiple(current, update)

    def new_instance(self, **kwargs) -> Event:
        """A copy with the given fields changed.

        Shallow: every field but ``modules`` and ``batches`` is an immutable value; ``modules``
        must stay the model's own modules (a deep copy would compress a copy, or clone a whole
        model) and ``batches`` the run's own data.
        """
        names = {f.name for f in fields(self)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"Event has no field(s) {sorted(unknown)}; fields are {sorted(names)}")
        instance = copy.copy(self)
        for key, value in kwargs.items():
            setattr(instance, key, value)
        return instance


def _is_multiple(value: float, of: float, tol: float = 1e-9) -> bool:
    ratio = value / of
    return abs(ratio - round(ratio)) < tol
