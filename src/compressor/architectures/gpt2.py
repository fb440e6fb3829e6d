"""GPT-2: Conv1D projections (transposed weights) with fused query, key and value; only the
layers are known."""

from __future__ import annotations

from compressor.architectures.base import Architecture

__all__ = ["ARCHITECTURE"]

ARCHITECTURE = Architecture(
    family="gpt2",
    model_types=("gpt2",),
    layers="transformer.h",
    base_layers="h",
)
