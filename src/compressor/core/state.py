"""What a compression run holds: the model, its teacher, the optimizer, the batch and loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["State"]


@dataclass
class State:
    """Everything modifiers may read or change during a run.

    What a pipeline hands a modifier for one event (the modules a calibration step is about)
    travels in the ``Event``, not here.

    :param model: the model being compressed
    :param teacher_model: a teacher for distillation, if any
    :param optimizer: the training optimizer, if any
    :param loss: the most recent loss, which LOSS_CALCULATED modifiers may replace
    :param batch_data: the current training batch
    """

    model: Any = None
    teacher_model: Any = None
    optimizer: Any = None
    loss: Any = None
    batch_data: Any = None

    def update(
        self,
        *,
        model: Any = None,
        teacher_model: Any = None,
        optimizer: Any = None,
        loss: Any = None,
        batch_data: Any = None,
    ) -> State:
        """Set every field that is given (not None); leave the others as they are."""
        given = {
            "model": model,
            "teacher_model": teacher_model,
            "optimizer": optimizer,
            "loss": loss,
            "batch_data": batch_data,
        }
        for name, value in given.items():
            if value is not None:
                setattr(self, name, value)
        return self
