"""The event lifecycle: events, state, counters and the session."""

from compressor.core.events import Event, EventType
from compressor.core.lifecycle import EventOrderError, Lifecycle
from compressor.core.state import Data, Hardware, State

__all__ = ["Data", "Event", "EventOrderError", "EventType", "Hardware", "Lifecycle", "State"]
