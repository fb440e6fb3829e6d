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
    """The pipeline to run: ``name``, or for ``auto`` sequential when a modifier needs
    calibration data and watches the pipeline's forwards (basic when the model's decoder
    layers cannot be found), else datafree (which still offers the batches at calibration
    start to a modifier that needs data only there: ``CalibrationTraits.observes_forwards``).
    """
    if name != "auto":
        if name not in PIPELINES:
            raise ValueError(
                f"pipeline={name!r} is unknown; expected one of auto, {', '.join(PIPELINES)}"
            )
        return name
    needing = [m for m in modifiers if m.requires_calibration_data()]
    if not needing:
        return "datafree"
    if not any(m.calibration_traits().observes_forwards for m in needing):
        logger.info(
            "{}: calibration data used only at calibration start, and no modifier watches a "
            "forward: datafree pipeline, no calibration pass",
            ", ".join(sorted({type(m).__name__ for m in needing})),
        )
        return "datafree"
    try:
        find_decoder_layers(model)
    except ValueError as err:
        logger.warning("sequential pipeline unavailable ({}); using the basic pipeline", err)
        return "basic"
    return "sequential"
