"""The counters of a run and the order in which events may arrive."""

from __future__ import annotations

from compressor.core.events import Event, EventType

__all__ = ["EventOrderError", "Lifecycle"]

E = EventType
# what may follow each event; None is the state right after initialize
_ALLOWED_AFTER: dict[EventType | None, frozenset[EventType]] = {
    None: frozenset({E.BATCH_START, E.CALIBRATION_EPOCH_START}),
    E.BATCH_START: frozenset({E.LOSS_CALCULATED, E.OPTIM_PRE_STEP, E.BATCH_END}),
    E.LOSS_CALCULATED: frozenset({E.LOSS_CALCULATED, E.OPTIM_PRE_STEP, E.BATCH_END}),
    E.OPTIM_PRE_STEP: frozenset({E.OPTIM_POST_STEP}),
    E.OPTIM_POST_STEP: frozenset({E.BATCH_END}),
    E.BATCH_END: frozenset({E.BATCH_START, E.CALIBRATION_EPOCH_START}),
    E.CALIBRATION_EPOCH_START: frozenset({E.SEQUENTIAL_EPOCH_END, E.CALIBRATION_EPOCH_END}),
    E.SEQUENTIAL_EPOCH_END: frozenset({E.SEQUENTIAL_EPOCH_END, E.CALIBRATION_EPOCH_END}),
    E.CALIBRATION_EPOCH_END: frozenset({E.BATCH_START, E.CALIBRATION_EPOCH_START}),
}


class EventOrderError(RuntimeError):
    """An event arrived where the lifecycle does not allow it."""


class Lifecycle:
    """Owns ``global_step`` and ``global_batch`` and checks the order of events.

    ``global_batch`` counts finished batches. ``global_step`` counts optimizer steps: it
    advances on OPTIM_POST_STEP when the optimizer is watched, otherwise every
    ``batches_per_step`` batches at BATCH_END. So under gradient accumulation the schedule
    counts optimizer steps, not micro-batches.

    :param steps_per_epoch: optimizer steps per epoch (offsets are then in epochs)
    :param batches_per_step: batches per optimizer step (gradient accumulation)
    :param start: the step (or epoch) at which the run begins, for resumed runs
    :param counts_optimizer_steps: whether OPTIM_POST_STEP events advance the step
    """

    def __init__(
        self,
        steps_per_epoch: int | None = None,
        batches_per_step: int | None = None,
        start: float | None = None,
        counts_optimizer_steps: bool = False,
    ) -> None:
        if steps_per_epoch is not None and steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch}")
        if batches_per_step is not None and batches_per_step <= 0:
            raise ValueError(f"batches_per_step must be a positive int, got {batches_per_step}")
        self.counts_optimizer_steps = counts_optimizer_steps
        self._event = Event(steps_per_epoch=steps_per_epoch, batches_per_step=batches_per_step)
        if start is not None:
            self._event.current_index = start
        self._last: EventType | None = None

    @property
    def event(self) -> Event:
        """A copy of the current counters."""
        return self._event.new_instance()

    def set_counters(self, global_step: int, global_batch: int) -> None:
        """Set the counters, for a run restored from a checkpoint."""
        if global_step < 0 or global_batch < 0:
            raise ValueError(
                f"counters must not be negative, got global_step={global_step}, "
                f"global_batch={global_batch}"
            )
        self._event.global_step = global_step
        self._event.global_batch = global_batch

    @property
    def last(self) -> EventType | None:
        return self._last

    def advance(self, type_: EventType, global_step: int | None = None) -> Event:
        """Check that ``type_`` may come now, update the counters and return its event.

        :param global_step: the caller's own step count (a Trainer's), which then wins
        """
        allowed = _ALLOWED_AFTER[self._last]
        if type_ not in allowed:
            after = self._last.value if self._last else "initialize"
            expected = ", ".join(sorted(t.value for t in allowed))
            raise EventOrderError(
                f"{type_.value} cannot follow {after}: expected one of {expected}"
            )
        ev = self._event
        if type_ == EventType.OPTIM_POST_STEP and self.counts_optimizer_steps:
            ev.global_step += 1
        elif type_ == EventType.BATCH_END:
            ev.global_batch += 1
            if (
                not self.counts_optimizer_steps
                and ev.global_batch % (ev.batches_per_step or 1) == 0
            ):
                ev.global_step += 1
        if global_step is not None:
            ev.global_step = global_step
        self._last = type_
        return ev.new_instance(type_=type_)
