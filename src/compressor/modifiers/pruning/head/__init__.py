from compressor.modifiers.pruning.head.base import HeadPruningModifier

__all__ = ["HeadPruningModifier"]
