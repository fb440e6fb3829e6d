"""Gemma: Llama's module names, but its RMSNorm scales by ``1 + weight`` and its embedding
output by ``sqrt(hidden_size)``, so Llama's norm fusion and rotations do not apply unchanged;
only the layers are known."""

from __future__ import annotations

from compressor.architectures.base import Architecture

__all__ = ["ARCHITECTURE"]

ARCHITECTURE = Architecture(
    family="gemma",
    model_types=("gemma",),
    layers="model.layers",
    base_layers="layers",
)
