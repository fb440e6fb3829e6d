"""Phi-3: fused ``qkv_proj`` and ``gate_up_proj`` projections, so Llama's per-projection mappings
do not apply; only the layers are known."""

from __future__ import annotations

from compressor.architectures.base import Architecture

__all__ = ["ARCHITECTURE"]

ARCHITECTURE = Architecture(
    family="phi3",
    model_types=("phi3",),
    layers="model.layers",
    base_layers="layers",
)
