"""The Modifier base class: schedule fields, lifecycle guards and the modifier registry."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from loguru import logger
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator
from torch.utils.hooks import RemovableHandle

from compressor.core.events import Event, EventType
from compressor.core.state import State
from compressor.modifiers.calibration_traits import CalibrationTraits
from compressor.modifiers.hooks import HooksMixin

__all__ = [
    "CalibrationTraits",
    "Modifier",
    "UnknownModifierError",
    "get_modifier_class",
    "registered_modifiers",
]

M = TypeVar("M", bound=type["Modifier"])

#: schedule offsets (steps or epochs) beyond this magnitude are refused: no run reaches them, so
#: a modifier given one would never fire (1e9 optimizer steps is ~1000x the longest runs)
MAX_SCHEDULE_OFFSET = 1e9
SCHEDULE_FIELDS = ("start", "end", "update")

_CALIBRATION_START = EventType.CALIBRATION_EPOCH_START
_CALIBRATION_END = EventType.CALIBRATION_EPOCH_END


class UnknownModifierError(KeyError):
    """A recipe names a modifier that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Modifier(BaseModel, HooksMixin):
    """Base of every compression technique.

    Public fields are exactly a recipe's arguments; runtime state lives in private attributes.
    The public methods ``initialize``, ``update_event`` and ``finalize`` guard the lifecycle
    and call the ``on_*`` hooks that subclasses override.

    **Lifecycle**

    - ``initialize``: ``on_initialize``, then ``on_start`` if the schedule has started at the
      session's first step
    - ``update_event``: ``on_event`` for every event; ``on_start`` on the BATCH_START (or
      CALIBRATION_EPOCH_START) that reaches ``start``; ``on_end`` on the BATCH_END (or
      CALIBRATION_EPOCH_END) that reaches ``end``; ``on_update`` while active
    - ``finalize``: ``on_end`` if still active, ``on_finalize``, then every hook is removed

    :param index: position of the modifier in its recipe (set by the recipe)
    :param group: the recipe group the modifier belongs to (set by the recipe)
    :param start: first step (or epoch) at which the modifier is active; unset means it only
        runs in post-training calibration; a negative value means from the beginning
    :param end: step (or epoch) at which it stops; unset means the end of the run
    :param update: how often, in steps (or epochs), ``should_update`` fires while active

    ``start``, ``end`` and ``update`` are finite numbers within ``MAX_SCHEDULE_OFFSET``
    (a boolean, such as YAML's ``yes``, is refused rather than read as 1).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    index: int | None = Field(default=None, exclude=True)
    group: str | None = Field(default=None, exclude=True)
    start: float | None = None
    end: float | None = None
    update: float | None = None

    @field_validator(*SCHEDULE_FIELDS, mode="before")
    @classmethod
    def _offset_not_a_boolean(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool):
            raise ValueError(
                f"{info.field_name} is a number of optimizer steps (or epochs), got the boolean "
                f"{value} (YAML reads yes/no/on/off/true/false as booleans)"
            )
        return value

    @field_validator(*SCHEDULE_FIELDS)
    @classmethod
    def _offset_in_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and not (math.isfinite(value) and abs(value) <= MAX_SCHEDULE_OFFSET):
            raise ValueError(
                f"{info.field_name} must be a finite number of optimizer steps (or epochs) "
                f"between {-MAX_SCHEDULE_OFFSET:g} and {MAX_SCHEDULE_OFFSET:g}, got {value}"
            )
        return value

    _initialized: bool = PrivateAttr(default=False)
    _finalized: bool = PrivateAttr(default=False)
    _started: bool = PrivateAttr(default=False)
    _ended: bool = PrivateAttr(default=False)
    _handles: list[RemovableHandle] = PrivateAttr(default_factory=list)

    _registry: ClassVar[dict[str, type[Modifier]]] = {}
    _aliases: ClassVar[dict[str, str]] = {}

    # ---------------------------------------------------------------- registry
    @classmethod
    def register(cls, *aliases: str) -> Callable[[M], M]:
        """Class decorator that makes a modifier available to recipes by name and aliases."""

        def decorator(modifier_cls: M) -> M:
            if not (isinstance(modifier_cls, type) and issubclass(modifier_cls, Modifier)):
                raise TypeError(f"only Modifier subclasses can be registered, got {modifier_cls}")
            for name in (modifier_cls.__name__, *aliases):
                owner = Modifier._registry.get(name)
                if owner is not None and owner is not modifier_cls:
                    raise ValueError(f"modifier name {name!r} is already taken by {owner.__name__}")
                Modifier._registry[name] = modifier_cls
                if name != modifier_cls.__name__:
                    Modifier._aliases[name] = modifier_cls.__name__
            return modifier_cls

        return decorator

    # ---------------------------------------------------------------- status
    @property
    def initialized(self) -> bool:
        return self._initialized

    @property
    def finalized(self) -> bool:
        return self._finalized

    @property
    def started(self) -> bool:
        return self._started

    @property
    def ended(self) -> bool:
        return self._ended

    # ---------------------------------------------------------------- schedule
    def training_schedule(self) -> dict[str, float]:
        """The schedule fields that are set (``start``, ``end``, ``update``): a modifier with
        any of them runs during training; post-training runs (``oneshot``) refuse it."""
        values = {name: getattr(self, name) for name in SCHEDULE_FIELDS}
        return {name: value for name, value in values.items() if value is not None}

    def should_start(self, event: Event) -> bool:
        if self.start is None:
            return False
        current = event.current_index
        return self.start <= current and (self.end is None or current < self.end)

    def should_end(self, event: Event) -> bool:
        return self.end is not None and event.current_index >= self.end

    def _starts_on_calibration(self, event: Event) -> bool:
        return self.start is None or self.start <= event.current_index

    # ---------------------------------------------------------------- lifecycle
    def initialize(self, state: State, event: Event | None = None) -> None:
        """Prepare the modifier; start it when its schedule has begun at ``event``.

        :param state: the run's state
        :param event: the counters at the start of the run (step 0 when not given)
        """
        if self._finalized:
            raise RuntimeError(f"{type(self).__name__} cannot be initialized after finalize")
        if self._initialized:
            raise RuntimeError(f"{type(self).__name__} is already initialized")
        start_event = (event or Event()).new_instance(type_=EventType.BATCH_START)
        try:
            self.on_initialize(state)
            self._initialized = True
            if self.should_start(start_event):
                self._start(state, start_event)
        except BaseException:
            self.remove_hooks()
            raise

    def update_event(self, state: State, event: Event) -> None:
        """Dispatch one event to the hooks, starting and ending the modifier on schedule."""
        if not self._initialized:
            raise RuntimeError(f"{type(self).__name__} received {event.type_} before initialize")
        if self._finalized:
            raise RuntimeError(f"{type(self).__name__} received {event.type_} after finalize")
        try:
            self.on_event(state, event)
            if event.type_ == EventType.BATCH_START and not self._started:
                if self.should_start(event):
                    self._start(state, event)
                    self.on_update(state, event)
            elif event.type_ == EventType.BATCH_END and self._started and not self._ended:
                if self.should_end(event):
                    self._end(state, event)
                    self.on_update(state, event)
                else:
                    self.on_update(state, event)
            elif event.type_ == _CALIBRATION_START and not self._started:
                if self._starts_on_calibration(event):
                    self._start(state, event)
                    self.on_update(state, event)
            elif event.type_ == _CALIBRATION_END and self._started and not self._ended:
                self.on_update(state, event)
                self._end(state, event)
            elif self._started and not self._ended:
                self.on_update(state, event)
        except BaseException:
            self.remove_hooks()
            raise

    def finalize(self, state: State) -> None:
        """End the modifier if it is still active, finish its work and remove its hooks."""
        if self._finalized:
            raise RuntimeError(f"{type(self).__name__} is already finalized")
        if not self._initialized:
            raise RuntimeError(f"{type(self).__name__} cannot be finalized before initialize")
        try:
            if self._started and not self._ended:
                self._end(state, Event(type_=EventType.FINALIZE))
            self.on_finalize(state)
        finally:
            self.remove_hooks()
            self._finalized = True

    def _start(self, state: State, event: Event) -> None:
        logger.debug(
            "{} starts on {} at index {}", type(self).__name__, event.type_, event.current_index
        )
        self.on_start(state, event)
        self._started = True

    def _end(self, state: State, event: Event) -> None:
        logger.debug(
            "{} ends on {} at index {}", type(self).__name__, event.type_, event.current_index
        )
        self.on_end(state, event)
        self._ended = True

    # ---------------------------------------------------------------- hooks to override
    def on_initialize(self, state: State) -> None:
        """Validate against the model and prepare; called once."""

    def on_start(self, state: State, event: Event) -> None:
        """The schedule has begun."""

    def on_update(self, state: State, event: Event) -> None:
        """Called for events while the modifier is active."""

    def on_end(self, state: State, event: Event) -> None:
        """The schedule has ended (or the run finalizes while it was active)."""

    def on_event(self, state: State, event: Event) -> None:
        """Called for every event, active or not."""

    def on_finalize(self, state: State) -> None:
        """Leave the model in its final, compressed form; called once."""

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Runtime state a resumed training run needs (masks, observers, a bit schedule).

        Saved in a training checkpoint and handed back to ``load_state_dict`` after the resumed
        run has initialized the modifier (and started it when its schedule has begun). Values
        may be tensors and plain Python data. The default has no state.
        """
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved; override together with ``state_dict``."""
        if state_dict:
            raise ValueError(
                f"{type(self).__name__} keeps no checkpoint state, but was given keys "
                f"{sorted(state_dict)}; override load_state_dict to restore them"
            )

    # ---------------------------------------------------------------- calibration needs
    def requires_calibration_data(self) -> bool:
        """Whether post-training calibration must run data through the model (observers,
        Hessians). Entry points use it to pick a pipeline and to fail early without data."""
        return False

    def calibration_traits(self) -> CalibrationTraits:
        """What the calibration pipelines may do with this modifier (offloaded models,
        forwards stopped early, merged batches, stages); override to allow more than the
        conservative defaults of ``CalibrationTraits``."""
        return CalibrationTraits()

    # ---------------------------------------------------------------- recipe form
    def recipe_args(self) -> dict[str, Any]:
        """The arguments that rebuild this modifier from a recipe (defaults left out)."""
        return self.model_dump(mode="json", exclude_defaults=True)


def registered_modifiers() -> list[str]:
    """Every name and alias a recipe may use."""
    return sorted(Modifier._registry)


def get_modifier_class(name: str) -> type[Modifier]:
    """The modifier class registered under ``name`` (a class name or an alias)."""
    try:
        return Modifier._registry[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(Modifier._registry), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModifierError(
            f"unknown modifier {name!r}{hint} Registered modifiers: "
            f"{', '.join(registered_modifiers()) or '(none)'}"
        ) from None
