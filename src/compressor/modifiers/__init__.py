"""Every modifier, registered for recipes by the imports below (explicit, never discovered)."""

from compressor.modifiers.base import (
    CalibrationTraits,
    Modifier,
    UnknownModifierError,
    get_modifier_class,
    registered_modifiers,
)
from compressor.modifiers.distillation import OutputDistillationModifier
from compressor.modifiers.hooks import HooksMixin
from compressor.modifiers.layer_reduction import LayerReductionModifier
from compressor.modifiers.pruning import (
    ChannelPruningModifier,
    ExpertPruningModifier,
    HeadPruningModifier,
    RowPruningModifier,
    SparseGPTModifier,
    SparsePruningModifier,
    WandaPruningModifier,
)
from compressor.modifiers.pruning.compat import ConstantPruningModifier, MagnitudePruningModifier
from compressor.modifiers.quantization import (
    GPTQModifier,
    QuantizationModifier,
    QuantizationSchemeMixin,
)
from compressor.modifiers.transform import (
    AWQModifier,
    LogarithmicEqualizationModifier,
    SmoothQuantModifier,
    SpinQuantModifier,
)

__all__ = [
    "AWQModifier",
    "CalibrationTraits",
    "ChannelPruningModifier",
    "ExpertPruningModifier",
    "ConstantPruningModifier",
    "HeadPruningModifier",
    "GPTQModifier",
    "HooksMixin",
    "LayerReductionModifier",
    "MagnitudePruningModifier",
    "Modifier",
    "OutputDistillationModifier",
    "QuantizationModifier",
    "QuantizationSchemeMixin",
    "RowPruningModifier",
    "LogarithmicEqualizationModifier",
    "SmoothQuantModifier",
    "SparseGPTModifier",
    "SparsePruningModifier",
    "SpinQuantModifier",
    "UnknownModifierError",
    "WandaPruningModifier",
    "get_modifier_class",
    "registered_modifiers",
]
