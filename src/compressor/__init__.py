"""compressor: one event lifecycle and one recipe format for compressing PyTorch models."""

from compressor.core import Event, EventType, State
from compressor.core.session import CompressionSession, active_session, create_session
from compressor.entrypoints.oneshot import oneshot
from compressor.entrypoints.save import save_compressed
from compressor.modifiers import Modifier, QuantizationModifier
from compressor.recipe import Recipe, RecipeError

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
    "save_compressed",
    "oneshot",
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
