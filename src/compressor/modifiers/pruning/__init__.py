"""Pruning: sparse (unstructured, N:M; SparseGPT, Wanda), rows, attention heads, channels and
whole mixture-of-experts experts."""

from compressor.modifiers.pruning.base import PruningModifierBase
from compressor.modifiers.pruning.channel import ChannelPruningModifier
from compressor.modifiers.pruning.expert_pruning import ExpertPruningModifier
from compressor.modifiers.pruning.head import HeadPruningModifier
from compressor.modifiers.pruning.mappings import StructureMapping
from compressor.modifiers.pruning.row import RowPruningModifier
from compressor.modifiers.pruning.sparse import SparsePruningModifier
from compressor.modifiers.pruning.sparsegpt import SparseGPTModifier
from compressor.modifiers.pruning.wanda import WandaPruningModifier

__all__ = [
    "ChannelPruningModifier",
    "ExpertPruningModifier",
    "HeadPruningModifier",
    "PruningModifierBase",
    "RowPruningModifier",
    "SparseGPTModifier",
    "SparsePruningModifier",
    "StructureMapping",
    "WandaPruningModifier",
]
