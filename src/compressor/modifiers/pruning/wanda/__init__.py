"""Wanda: pruning by weights and activations, per output row (Sun et al., 2024)."""

from compressor.modifiers.pruning.wanda.base import WandaPruningModifier
from compressor.modifiers.pruning.wanda.wanda import accumulate_square_sums, wanda_mask

__all__ = ["WandaPruningModifier", "accumulate_square_sums", "wanda_mask"]
