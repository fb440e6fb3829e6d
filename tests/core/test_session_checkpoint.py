"""Sending optimizer events yourself, and saving / restoring a session for resumed runs."""

import pytest
import torch
from pydantic import PrivateAttr

from compressor import CompressionSession, Modifier
from compressor.core import Event
from recording import RecordingModifier


@Modifier.register()
class TallyModifier(RecordingModifier):
    """Keeps a tensor it updates while active; the tensor is its checkpoint state."""

    _tally: torch.Tensor = PrivateAttr(default_factory=lambda: torch.zeros(2))

    def on_update(self, state, event):
        super().on_update(state, event)
        self._tally += 1

    def state_dict(self):
        return {"tally": self._tally.clone()}

    def load_state_dict(self, state_dict):
        self._tally = state_dict["tally"].clone()


def _steps(session, opt, n, send_optimizer_events):
    for _ in range(n):
        session.batch_start()
        if send_optimizer_events:
            session.optim_pre_step()
        opt.step()
        if send_optimizer_events:
            session.optim_post_step()
        session.batch_end()


def test_unwatched_optimizer_events_are_sent_by_the_caller():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = CompressionSession()
    session.initialize(model=model, recipe=[RecordingModifier(start=1)], optimizer=opt,
                       watch_optimizer=False)  # fmt: skip
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    _steps(session, opt, 3, send_optimizer_events=True)
    (recorder,) = session.modifiers
    post = [s for t, s, _ in recorder.calls("event") if t == "optim_post_step"]
    assert post == [1, 2, 3] and recorder.steps("start") == [1]
    # a caller may impose the step count (a Trainer's), on every event
    session.batch_start(global_step=10)
    assert session.optim_pre_step(global_step=10).global_step == 10
    assert session.optim_post_step(global_step=11).global_step == 11
    session.finalize()


def test_sending_optimizer_events_for_a_watched_optimizer_is_an_error():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = CompressionSession()
    session.initialize(model=model, recipe=[RecordingModifier()], optimizer=opt)
    session.batch_start()
    with pytest.raises(RuntimeError, match="watch_optimizer=False"):
        session.optim_pre_step()


def test_a_restored_session_continues_the_counters_and_the_modifier_state():
    def run(steps, restore=None, start=None):
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        session = CompressionSession()
        session.initialize(model=model, recipe=[TallyModifier(start=1, end=5)], optimizer=opt,
                           batches_per_step=1, start=start)  # fmt: skip
        if restore is not None:
            session.load_state_dict(restore)
        _steps(session, opt, steps, send_optimizer_events=False)
        return session

    full = run(6)
    first = run(3)
    saved = first.state_dict()
    assert saved["global_step"] == 3 and saved["modifiers"][0]["type"] == "TallyModifier"
    resumed = run(3, restore=saved, start=3)
    assert resumed.event.global_step == full.event.global_step == 6
    assert torch.equal(resumed.modifiers[0]._tally, full.modifiers[0]._tally)
    assert resumed.modifiers[0].steps("end") == full.modifiers[0].steps("end") == [5]


def test_restoring_into_another_recipe_names_both():
    session = CompressionSession()
    session.initialize(model=torch.nn.Linear(2, 2), recipe=[RecordingModifier()])
    saved = {"global_step": 0, "global_batch": 0, "modifiers": [{"type": "TallyModifier"}]}
    with pytest.raises(ValueError, match=r"\['TallyModifier'\].*\['RecordingModifier'\]"):
        session.load_state_dict(saved)


def test_a_modifier_without_state_rejects_state_it_cannot_restore():
    modifier = RecordingModifier()
    assert modifier.state_dict() == {}
    modifier.load_state_dict({})
    with pytest.raises(ValueError, match=r"RecordingModifier keeps no checkpoint state.*'mask'"):
        modifier.load_state_dict({"mask": torch.ones(1)})


def test_a_start_given_in_epochs_lands_on_its_step():
    # 61 / 7 * 7 is 60.99999999999999 in floating point
    event = Event(steps_per_epoch=7)
    event.current_index = 61 / 7
    assert event.global_step == 61
