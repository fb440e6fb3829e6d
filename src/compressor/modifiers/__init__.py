"""Every modifier, registered for recipes by the imports below (explicit, never discovered)."""

from compressor.modifiers.base import (
    Modifier,
    UnknownModifierError,
    get_modifier_class,
    registered_modifiers,
)
from compressor.modifiers.hooks import HooksMixin
from compressor.modifiers.pruning import (
    ChannelPruningModifier,
    HeadPruningModifier,
    RowPruningModifier,
    SparsePruningModifier,
)
from compressor.modifiers.quantization import (
    GPTQModifier,
    QuantizationModifier,
    QuantizationSchemeMixin,
)
from compressor.modifiers.transform import SpinQuantModifier

__all__ = [
    "ChannelPruningModifier",
    "GPTQModifier",
    "HeadPruningModifier",
    "HooksMixin",
    "Modifier",
    "QuantizationModifier",
    "QuantizationSchemeMixin",
    "RowPruningModifier",
    "SparsePruningModifier",
    "SpinQuantModifier",
    "UnknownModifierError",
    "get_modifier_class",
    "registered_modifiers",
]
