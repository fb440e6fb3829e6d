from compressor.modifiers.pruning.row.base import RowPruningModifier

__all__ = ["RowPruningModifier"]
