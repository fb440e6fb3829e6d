import pytest
import torch
from pydantic import ValidationError

from compressor.core import Event, EventType, State
from compressor.modifiers import Modifier, get_modifier_class
from compressor.modifiers.base import UnknownModifierError
from recording import RecordingModifier

E = EventType


def run_schedule(modifier, steps, steps_per_epoch=None):
    """Drive BATCH_START/BATCH_END for `steps` steps; return the steps seen by start/end."""
    state = State(model=torch.nn.Linear(2, 2))
    modifier.initialize(state, Event(steps_per_epoch=steps_per_epoch))
    for step in range(steps):
        modifier.update_event(state, Event(E.BATCH_START, steps_per_epoch, global_step=step))
        modifier.update_event(state, Event(E.BATCH_END, steps_per_epoch, global_step=step + 1))
    modifier.finalize(state)
    return modifier


def test_unknown_fields_are_rejected():
    with pytest.raises(ValidationError, match="sttart"):
        RecordingModifier(sttart=1)


def test_runtime_status_is_not_a_field():
    fields = set(RecordingModifier.model_fields)
    assert {"start", "end", "update", "index", "group", "tag"} <= fields
    assert not fields & {"initialized", "started", "ended", "finalized"}
    with pytest.raises(ValidationError):
        RecordingModifier(started=True)


@pytest.mark.parametrize(
    "start, end, start_step, end_step, updates",
    [
        # started at initialize; updated at every batch event while active; BATCH_END 3 ends it
        (0, 3, 0, 3, [0, 1, 1, 2, 2, 3]),
        (2, 5, 2, 5, [2, 3, 3, 4, 4, 5]),
        (-1, None, 0, None, [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]),  # negative: from the start
        (4, None, 4, None, [4, 5, 5, 6]),
        (None, None, None, None, []),  # post-training only: never starts in training
        (7, 9, None, None, []),  # beyond the run
    ],
)
def test_step_based_start_and_end(start, end, start_step, end_step, updates):
    modifier = run_schedule(RecordingModifier(start=start, end=end), steps=6)
    assert modifier.steps("start") == ([] if start_step is None else [start_step])
    ends = modifier.calls("end")
    if end_step is None:
        # a started modifier without end is ended by finalize
        assert [t for t, _, _ in ends] == (["finalize"] if start_step is not None else [])
    else:
        assert [(t, s) for t, s, _ in ends] == [("batch_end", end_step)]
    assert modifier.steps("update") == updates
    assert modifier.finalized and modifier.calls("finalize") == [(None, -1, -1)]


def test_epoch_based_offsets():
    # 4 steps per epoch; start at epoch 0.5 (step 2), end at epoch 1.5 (step 6)
    modifier = run_schedule(RecordingModifier(start=0.5, end=1.5), steps=8, steps_per_epoch=4)
    assert modifier.steps("start") == [2]
    assert modifier.steps("end") == [6]


def test_started_at_initialize_when_schedule_has_begun():
    state = State()
    modifier = RecordingModifier(start=3)
    modifier.initialize(state, Event(global_step=5))
    assert modifier.started and modifier.steps("start") == [5]
    modifier.finalize(state)


def test_calibration_events_start_and_end_post_training_modifiers():
    state = State()
    modifier = RecordingModifier()  # no start: post-training
    modifier.initialize(state)
    assert not modifier.started
    modifier.update_event(state, Event(E.CALIBRATION_EPOCH_START))
    assert modifier.started
    modifier.update_event(state, Event(E.SEQUENTIAL_EPOCH_END))
    modifier.update_event(state, Event(E.CALIBRATION_EPOCH_END))
    assert modifier.ended
    assert [t for t, _, _ in modifier.calls("update")] == [
        "calibration_epoch_start",
        "sequential_epoch_end",
        "calibration_epoch_end",
    ]
    modifier.finalize(state)


def test_calibration_does_not_start_a_modifier_scheduled_later():
    state = State()
    modifier = RecordingModifier(start=10)
    modifier.initialize(state)
    modifier.update_event(state, Event(E.CALIBRATION_EPOCH_START))
    assert not modifier.started
    modifier.finalize(state)


def test_lifecycle_guards():
    state = State()
    modifier = RecordingModifier()
    with pytest.raises(RuntimeError, match="before initialize"):
        modifier.update_event(state, Event(E.BATCH_START))
    with pytest.raises(RuntimeError, match="before initialize"):
        modifier.finalize(state)
    modifier.initialize(state)
    with pytest.raises(RuntimeError, match="already initialized"):
        modifier.initialize(state)
    modifier.finalize(state)
    with pytest.raises(RuntimeError, match="already finalized"):
        modifier.finalize(state)
    with pytest.raises(RuntimeError, match="after finalize"):
        modifier.update_event(state, Event(E.BATCH_START))
    with pytest.raises(RuntimeError, match="after finalize"):
        modifier.initialize(state)


def test_on_event_sees_every_event_even_when_inactive():
    modifier = run_schedule(RecordingModifier(start=10), steps=2)
    assert len(modifier.calls("event")) == 4


class _HookingModifier(RecordingModifier):
    fail_on_start: bool = False

    def on_initialize(self, state):
        self.register_hook(state.model, lambda *a: None, "forward")
        self.register_hook(state.model.weight, lambda g: g, "tensor")

    def on_start(self, state, event):
        if self.fail_on_start:
            raise ValueError("boom")


def test_hooks_are_removed_at_finalize():
    model = torch.nn.Linear(2, 2)
    state = State(model=model)
    modifier = _HookingModifier(start=0)
    modifier.initialize(state)
    assert modifier.num_hooks == 2 and len(model._forward_hooks) == 1
    modifier.finalize(state)
    assert modifier.num_hooks == 0 and len(model._forward_hooks) == 0


def test_hooks_are_removed_when_a_run_fails():
    model = torch.nn.Linear(2, 2)
    state = State(model=model)
    modifier = _HookingModifier(start=1, fail_on_start=True)
    modifier.initialize(state)
    assert len(model._forward_hooks) == 1
    with pytest.raises(ValueError, match="boom"):
        modifier.update_event(state, Event(E.BATCH_START, global_step=1))
    assert len(model._forward_hooks) == 0


def test_disable_hooks_pauses_hooks():
    model = torch.nn.Linear(2, 2)
    seen = []
    modifier = RecordingModifier()
    modifier.register_hook(model, lambda mod, args, out: seen.append(1), "forward")
    model(torch.zeros(1, 2))
    with Modifier.disable_hooks():
        model(torch.zeros(1, 2))
    model(torch.zeros(1, 2))
    assert seen == [1, 1]
    modifier.remove_hooks()


def test_registry_by_name_and_alias():
    assert get_modifier_class("RecordingModifier") is RecordingModifier
    assert get_modifier_class("Recorder") is RecordingModifier
    with pytest.raises(UnknownModifierError, match="did you mean RecordingModifier"):
        get_modifier_class("RecordingModifer")


def test_registry_rejects_a_taken_name():
    with pytest.raises(ValueError, match="already taken"):

        @Modifier.register("Recorder")
        class Other(Modifier):
            pass
