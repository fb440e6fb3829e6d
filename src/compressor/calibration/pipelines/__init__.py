"""Calibration pipelines: how calibration data flows through the model during oneshot.

Every pipeline has the signature ``run(model, batches, session, device=None)`` and sends the
calibration events itself (start, SEQUENTIAL_EPOCH_END, end).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from loguru import logger

from compressor.architectures import find_decoder_layers
from compressor.calibration.pipelines.basic import run_basic
from compressor.calibration.pipelines.datafree import run_datafree
from compressor.calibration.pipelines.layer_calls import LayerInputs
from compressor.calibration.pipelines.sequential import capture_layer_inputs, run_sequential
from compressor.modifiers.base import Modifier

__all__ = [
    "PIPELINES",
    "LayerInputs",
    "capture_layer_inputs",
    "resolve_pipeline",
    "run_basic",
    "run_datafree",
    "run_sequential",
]

Pipeline = Callable[..., Any]
PIPELINES: dict[str, Pipeline] = {
    "datafree": run_datafree,
    "basic": run_basic,
    "sequential": run_sequential,
}


def resolve_pipeline(name: str, modifiers: Sequence[Modifier], model: torch.nn.Module) -> str:
    """The pipeline to run: ``name``, or for ``auto`` sequential when any modifier needs
    calibration data (basic when the model's decoder layers cannot be found), else datafree.
    """
    if name != "auto":
        if name not in PIPELINES:
            raise ValueError(
                f"pipeline={name!r} is unknown; expected one of auto, {', '.join(PIPELINES)}"
            )
        return name
    if not any(m.requires_calibration_data() for m in modifiers):
        return "datafree"
    try:
        find_decoder_layers(model)
    except ValueError as err:
        logger.warning("sequential pipeline unavailable ({}); using the basic pipeline", err)
        return "basic"
    return "sequential"
