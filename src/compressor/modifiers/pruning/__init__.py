"""Pruning: sparse (unstructured, N:M), rows, attention heads and convolution channels."""

from compressor.modifiers.pruning.base import PruningModifierBase
from compressor.modifiers.pruning.sparse import SparsePruningModifier

__all__ = ["PruningModifierBase", "SparsePruningModifier"]
