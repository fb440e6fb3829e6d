"""Transforms that change a model's weights without changing its function: rotations
(SpinQuant) and per-channel scales (SmoothQuant, AWQ)."""

from compressor.modifiers.transform.awq import AWQModifier
from compressor.modifiers.transform.smoothquant import (
    LogarithmicEqualizationModifier,
    SmoothQuantModifier,
)
from compressor.modifiers.transform.spinquant import SpinQuantModifier

__all__ = [
    "AWQModifier",
    "LogarithmicEqualizationModifier",
    "SmoothQuantModifier",
    "SpinQuantModifier",
]
