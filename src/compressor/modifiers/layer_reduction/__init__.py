"""Layer reduction: fewer decoder layers, chosen by index or by angular distance."""

from compressor.modifiers.layer_reduction.base import LayerReductionModifier
from compressor.modifiers.layer_reduction.surgery import angular_distance, keep_decoder_layers

__all__ = ["LayerReductionModifier", "angular_distance", "keep_decoder_layers"]
