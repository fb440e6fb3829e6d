"""How calibration data is prepared and run through the model, validated up front."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compressor.utils.devices import check_device

__all__ = ["CalibrationArguments", "PipelineName"]

PipelineName = Literal["auto", "datafree", "basic", "sequential"]


class CalibrationArguments(BaseModel):
    """How calibration data is prepared and run through the model.

    :param num_calibration_samples: how many sequences to calibrate on
    :param max_seq_length: tokens per sequence at most (longer ones are truncated)
    :param batch_size: sequences per forward pass (shorter ones are right-padded)
    :param pipeline: ``auto`` (sequential when a modifier needs data, else datafree),
        ``datafree`` (no forward passes), ``basic`` (whole model per batch) or ``sequential``
        (one decoder layer at a time)
    :param device: where the sequential pipeline computes; each layer is moved there in turn.
        Unset: where the model's parameters already are. Checked against the devices this
        torch build sees
    :param seed: seed for text sampled from the model (``dataset="self"``)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_calibration_samples: int = Field(256, ge=1)
    max_seq_length: int = Field(512, ge=2)
    batch_size: int = Field(1, ge=1)
    pipeline: PipelineName = "auto"
    device: str | None = None
    seed: int = 0

    @field_validator("device")
    @classmethod
    def _device_exists(cls, device: str | None) -> str | None:
        if device is not None:
            check_device(device)
        return device
