"""The data-free pipeline: the calibration events, with no forward passes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from compressor.calibration.data import Batch
from compressor.core.session import CompressionSession

__all__ = ["run_datafree"]


def run_datafree(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    session: CompressionSession,
    device: str | torch.device | None = None,
) -> None:
    """Calibration start, one SEQUENTIAL_EPOCH_END for the whole model, calibration end.

    For modifiers that need no data (round-to-nearest weight quantization, magnitude pruning):
    they compress at SEQUENTIAL_EPOCH_END or at calibration end. ``batches`` run through
    nothing, they are only offered at calibration start (``Event.batches``); ``device`` is
    unused; the signature is that of every pipeline.
    """
    session.calibration_epoch_start(batches)
    session.sequential_epoch_end(model)
    session.calibration_epoch_end()
