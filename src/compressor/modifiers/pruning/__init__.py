"""Pruning: sparse (unstructured, N:M), rows, attention heads and convolution channels."""

from compressor.modifiers.pruning.base import PruningModifierBase
from compressor.modifiers.pruning.channel import ChannelPruningModifier
from compressor.modifiers.pruning.head import HeadPruningModifier
from compressor.modifiers.pruning.mappings import StructureMapping
from compressor.modifiers.pruning.row import RowPruningModifier
from compressor.modifiers.pruning.sparse import SparsePruningModifier

__all__ = [
    "ChannelPruningModifier",
    "HeadPruningModifier",
    "PruningModifierBase",
    "RowPruningModifier",
    "SparsePruningModifier",
    "StructureMapping",
]
