"""The event lifecycle: events, state, counters and the session."""

from compressor.core.events import Event, EventType
from compressor.core.lifecycle import EventOrderError, Lifecycle
from compressor.core.state import State

__all__ = ["Event", "EventOrderError", "EventType", "Lifecycle", "State"]
