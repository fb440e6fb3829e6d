"""compressor: one event lifecycle and one recipe format for compressing PyTorch models."""

from compressor.core import Event, EventType, State
from compressor.core.session import CompressionSession, active_session, create_session
from compressor.entrypoints.oneshot import oneshot
from compressor.modifiers import Modifier
from compressor.recipe import Recipe, RecipeError

__version__ = "0.1.0"

__all__ = [
    "CompressionSession",
    "Event",
    "EventType",
    "Modifier",
    "Recipe",
    "RecipeError",
    "State",
    "__version__",
    "active_session",
    "create_session",
    "oneshot",
]
