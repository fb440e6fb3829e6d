"""compressor: one event lifecycle and one recipe format for compressing PyTorch models."""

from compressor.core import Event, EventType, State
from compressor.core.session import CompressionSession, active_session, create_session
from compressor.entrypoints.oneshot import oneshot
from compressor.entrypoints.save import save_compressed
from compressor.modifiers import Modifier, QuantizationModifier
from compressor.recipe import Recipe, RecipeError

__version__ = "0.1.0"

__all__ = [
    "CompressionSession",
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
