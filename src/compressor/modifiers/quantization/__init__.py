"""Quantization of weights and activations with compressed-tensors schemes."""

from compressor.modifiers.quantization.base import QuantizationModifier
from compressor.modifiers.quantization.gptq.base import GPTQModifier
from compressor.modifiers.quantization.matching import (
    apply_quantization,
    match_quantizable_modules,
    scheme_for_module,
)
from compressor.modifiers.quantization.scheme import (
    SUPPORTED_PRESETS,
    QuantizationSchemeMixin,
    resolve_quantization_config,
)

__all__ = [
    "GPTQModifier",
    "SUPPORTED_PRESETS",
    "QuantizationModifier",
    "QuantizationSchemeMixin",
    "apply_quantization",
    "match_quantizable_modules",
    "resolve_quantization_config",
    "scheme_for_module",
]
