"""llm-compressor's pruning modifiers, by their names and fields, on our machinery."""

from compressor.modifiers.pruning.compat.llmcompressor import (
    ConstantPruningModifier,
    MagnitudePruningModifier,
)

__all__ = ["ConstantPruningModifier", "MagnitudePruningModifier"]
