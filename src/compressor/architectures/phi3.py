"""Phi-3: fused ``qkv_proj`` and ``gate_up_proj`` projections, so Llama's per-projection mappings
do not apply to pruning or rotations. Smoothing scales do: the norms feed the fused
projections, and a scale on the fused projection's last rows (its v part, its up part) moves
to ``o_proj``'s and ``down_proj``'s columns."""

from __future__ import annotations

from compressor.architectures.base import Architecture
from compressor.architectures.mappings import SmoothingMapping

__all__ = ["ARCHITECTURE"]

SMOOTHQUANT = (
    SmoothingMapping(smooth_layer="re:.*input_layernorm$", balance_layers=["re:.*qkv_proj$"]),
    SmoothingMapping(
        smooth_layer="re:.*post_attention_layernorm$", balance_layers=["re:.*gate_up_proj$"]
    ),
)

AWQ = (
    SMOOTHQUANT[0],
    SmoothingMapping(smooth_layer="re:.*qkv_proj$", balance_layers=["re:.*o_proj$"]),
    SMOOTHQUANT[1],
    SmoothingMapping(smooth_layer="re:.*gate_up_proj$", balance_layers=["re:.*down_proj$"]),
)

ARCHITECTURE = Architecture(
    family="phi3",
    model_types=("phi3",),
    layers="model.layers",
    base_layers="layers",
    smoothquant=SMOOTHQUANT,
    awq=AWQ,
)
