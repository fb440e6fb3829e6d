from compressor.modifiers.pruning.sparse.base import SparsePruningModifier, parse_mask_structure

__all__ = ["SparsePruningModifier", "parse_mask_structure"]
