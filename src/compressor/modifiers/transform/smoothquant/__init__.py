"""SmoothQuant: activation outliers moved into the weights by per-channel scales."""

from compressor.modifiers.transform.smoothquant.base import SmoothQuantModifier
from compressor.modifiers.transform.smoothquant.scales import smoothquant_scales

__all__ = ["SmoothQuantModifier", "smoothquant_scales"]
