"""The basic pipeline: every calibration batch through the whole model."""

from __future__ import annotations

import contextlib
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
from compressor.calibration.pipelines.sequential import transforming_first
from compressor.core.session import CompressionSession
from compressor.modifiers.hooks import HooksMixin
from compressor.modifiers.transform.smoothing import quantized_forwards_off
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
    the whole model at once. Modifiers that transform first
    (``CalibrationTraits.transforms_first``) get a pass of their own and their own
    SEQUENTIAL_EPOCH_END before the others calibrate.
    """
    target = model_device(model)
    keep_freed_tensors_in_heap()  # no page faults for every activation (glibc)
    session.calibration_epoch_start(batches)
    first, rest = transforming_first(session.modifiers)
    with calibration_mode(model):
        if first:  # their transforms first, then the others calibrate the transformed model
            with HooksMixin.hooks_only_of(first), quantized_forwards_off(model):
                for batch in tqdm(batches, desc="calibration batches (transforms)"):
                    call_model(model, to_device(batch, target))
            session.sequential_epoch_end(model, only=first)
        with HooksMixin.hooks_only_of(rest) if first else contextlib.nullcontext():
            for batch in tqdm(batches, desc="calibration batches"):
                call_model(model, to_device(batch, target))
    session.sequential_epoch_end(model)
    session.calibration_epoch_end()
