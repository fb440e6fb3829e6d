"""What a compression run holds: the model, its teacher, the optimizer, data and loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Data", "Hardware", "State"]


@dataclass
class Data:
    """The data a run was given, by purpose."""

    train: Any = None
    val: Any = None
    test: Any = None
    calib: Any = None


@dataclass
class Hardware:
    """Where the run computes."""

    device: str | torch.device | None = None
    rank: int = 0
    world_size: int = 1


@dataclass
class State:
    """Everything modifiers may read or change during a run.

    :param model: the model being compressed
    :param teacher_model: a teacher for distillation, if any
    :param optimizer: the training optimizer, if any
    :param optim_wrapped: whether the optimizer was wrapped (for example by accelerate)
    :param loss: the most recent loss, which LOSS_CALCULATED modifiers may replace
    :param batch_data: the current batch
    :param data: train / val / test / calib data
    :param hardware: device and process placement
    :param loggers: loggers that modifiers may report to
    :param model_log_cadence: log model statistics every this many epochs or steps
    """

    model: Any = None
    teacher_model: Any = None
    optimizer: Any = None
    optim_wrapped: bool | None = None
    loss: Any = None
    batch_data: Any = None
    data: Data = field(default_factory=Data)
    hardware: Hardware = field(default_factory=Hardware)
    loggers: Any = None
    model_log_cadence: float | None = None

    def update(
        self,
        *,
        model: Any = None,
        teacher_model: Any = None,
        optimizer: Any = None,
        optim_wrapped: bool | None = None,
        loss: Any = None,
        batch_data: Any = None,
        train_data: Any = None,
        val_data: Any = None,
        test_data: Any = None,
        calib_data: Any = None,
        device: str | torch.device | None = None,
        loggers: Any = None,
        model_log_cadence: float | None = None,
    ) -> State:
        """Set every field that is given (not None); leave the others as they are."""
        given = {
            "model": model,
            "teacher_model": teacher_model,
            "optimizer": optimizer,
            "optim_wrapped": optim_wrapped,
            "loss": loss,
            "batch_data": batch_data,
            "loggers": loggers,
            "model_log_cadence": model_log_cadence,
        }
        for name, value in given.items():
            if value is not None:
                setattr(self, name, value)
        for name, value in {
            "train": train_data,
            "val": val_data,
            "test": test_data,
            "calib": calib_data,
        }.items():
            if value is not None:
                setattr(self.data, name, value)
        if device is not None:
            self.hardware.device = device
        return self
