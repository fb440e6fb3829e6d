"""A modifier for tests that records when each of its hooks ran."""

from __future__ import annotations

from pydantic import PrivateAttr

from compressor.core import Event, State
from compressor.modifiers import Modifier


@Modifier.register("Recorder")
class RecordingModifier(Modifier):
    """Records (hook, event type, global_step, global_batch) for every hook call."""

    tag: str = ""
    scale_loss: float | None = None

    _calls: list[tuple[str, str | None, int, int]] = PrivateAttr(default_factory=list)

    def _record(self, hook: str, event: Event | None) -> None:
        if event is None:
            self._calls.append((hook, None, -1, -1))
        else:
            type_ = event.type_.value if event.type_ else None
            self._calls.append((hook, type_, event.global_step, event.global_batch))

    def on_initialize(self, state: State) -> None:
        self._record("initialize", None)

    def on_start(self, state: State, event: Event) -> None:
        self._record("start", event)

    def on_update(self, state: State, event: Event) -> None:
        self._record("update", event)

    def on_end(self, state: State, event: Event) -> None:
        self._record("end", event)

    def on_event(self, state: State, event: Event) -> None:
        self._record("event", event)
        is_loss = event.type_ is not None and event.type_.value == "loss_calculated"
        if self.scale_loss is not None and is_loss and self.started and not self.ended:
            state.loss = state.loss * self.scale_loss

    def on_finalize(self, state: State) -> None:
        self._record("finalize", None)

    def calls(self, hook: str) -> list[tuple[str | None, int, int]]:
        return [(t, s, b) for h, t, s, b in self._calls if h == hook]

    def steps(self, hook: str) -> list[int]:
        return [s for _, s, _ in self.calls(hook)]
