"""AWQ: activation-aware per-channel weight scales, searched for the quantization grid."""

from compressor.modifiers.transform.awq.base import AWQModifier
from compressor.modifiers.transform.awq.search import (
    awq_grid,
    candidate_scales,
    quantize_with_scales,
    weight_means,
)

__all__ = ["AWQModifier", "awq_grid", "candidate_scales", "quantize_with_scales", "weight_means"]
