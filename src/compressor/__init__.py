"""compressor: one event lifecycle and one recipe format for compressing PyTorch models.

This package root is the one place that may import every layer. It also plugs the higher
layers into the core session (which imports none of them): recipes given as paths, dicts or
lists of modifiers are resolved by the recipe layer, and a session that quantized its model
makes ``model.save_pretrained`` write the compressed-tensors format (checkpoint layer).
"""

from compressor.checkpoint import save_compressed, save_pretrained_compressed_after
from compressor.core import Event, EventType, State
from compressor.core.session import CompressionSession, active_session, create_session
from compressor.entrypoints.oneshot import oneshot
from compressor.modifiers import Modifier, QuantizationModifier
from compressor.modifiers.pruning.removal import remove_pruned_structure
from compressor.recipe import Recipe, RecipeError, resolve_recipe

CompressionSession.recipe_resolver = resolve_recipe
CompressionSession.finalize_steps.append(save_pretrained_compressed_after)

__version__ = "0.1.0"

__all__ = [
    "CompressionCallback",
    "CompressionSession",
    "CompressionTrainer",
    "Event",
    "EventType",
    "Modifier",
    "QuantizationModifier",
    "Recipe",
    "RecipeError",
    "State",
    "__version__",
    "active_session",
    "create_session",
    "oneshot",
    "remove_pruned_structure",
    "save_compressed",
]


_LAZY = {  # imported on first use: they pull in transformers' Trainer
    "CompressionCallback": "compressor.entrypoints.trainer",
    "CompressionTrainer": "compressor.entrypoints.trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")
