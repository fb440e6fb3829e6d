"""Gemma: Llama's module names, but its RMSNorm scales by ``1 + weight`` and its embedding
output by ``sqrt(hidden_size)``, so Llama's norm fusion and rotations do not apply unchanged.
SmoothQuant's and AWQ's scales fold into its norms with that offset
(``norm_weight_offset``), so Llama's smoothing mappings apply."""

from __future__ import annotations

from compressor.architectures import llama
from compressor.architectures.base import Architecture

__all__ = ["ARCHITECTURE"]

ARCHITECTURE = Architecture(
    family="gemma",
    model_types=("gemma",),
    layers="model.layers",
    base_layers="layers",
    smoothquant=llama.SMOOTHQUANT,
    awq=llama.AWQ,
    norm_weight_offset=1.0,
)
