"""The basic pipeline: every calibration batch through the whole model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from compressor.calibration.data import Batch
from compressor.calibration.pipelines.common import (
    calibration_mode,
    call_model,
    model_device,
    to_device,
)
from compressor.core.session import CompressionSession
from compressor.utils.memory import keep_freed_tensors_in_heap

__all__ = ["run_basic"]


def run_basic(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    session: CompressionSession,
    device: str | torch.device | None = None,
) -> None:
    """Calibration start, a forward pass of every batch with the modifiers' hooks live, one
    SEQUENTIAL_EPOCH_END for the whole model, calibration end.

    The whole model sits on one device (``device`` is unused: the model's own device is used).
    Suits models whose decoder layers cannot be found, and modifiers whose statistics need
    the whole model at once.
    """
    target = model_device(model)
    keep_freed_tensors_in_heap()  # no page faults for every activation (glibc)
    session.calibration_epoch_start()
    with calibration_mode(model):
        for batch in tqdm(batches, desc="calibration batches"):
            call_model(model, to_device(batch, target))
    session.sequential_epoch_end(model)
    session.calibration_epoch_end()
