"""SmoothQuant: activation outliers moved into the weights by per-channel scales."""

from compressor.modifiers.transform.smoothquant.base import (
    LogarithmicEqualizationModifier,
    SmoothQuantModifier,
)
from compressor.modifiers.transform.smoothquant.scales import (
    log_equalization_scales,
    smoothquant_scales,
)

__all__ = [
    "LogarithmicEqualizationModifier",
    "SmoothQuantModifier",
    "log_equalization_scales",
    "smoothquant_scales",
]
