"""The lifecycle on its own: the order events may come in, the counters it keeps, and the copies
of them it hands out."""

import pytest

from compressor.core import EventOrderError, EventType, Lifecycle

E = EventType


def _advance(lifecycle, *types):
    return [lifecycle.advance(t) for t in types]


def test_a_batch_may_report_its_loss_more_than_once():
    """A training step that computes several losses (a distillation loss beside the task's, a
    Trainer whose compute_loss is called again) sends LOSS_CALCULATED for each."""
    lifecycle = Lifecycle(counts_optimizer_steps=True)
    events = _advance(
        lifecycle,
        E.BATCH_START,
        E.LOSS_CALCULATED,
        E.LOSS_CALCULATED,
        E.OPTIM_PRE_STEP,
        E.OPTIM_POST_STEP,
        E.BATCH_END,
    )
    assert [e.type_ for e in events][1:3] == [E.LOSS_CALCULATED, E.LOSS_CALCULATED]
    assert (events[-1].global_step, events[-1].global_batch) == (1, 1)


@pytest.mark.parametrize(
    "after, refused",
    [
        ((E.BATCH_START, E.OPTIM_PRE_STEP), E.BATCH_END),
        ((E.BATCH_START, E.OPTIM_PRE_STEP), E.LOSS_CALCULATED),
        ((E.BATCH_START, E.OPTIM_PRE_STEP), E.OPTIM_PRE_STEP),
        ((E.BATCH_START, E.OPTIM_PRE_STEP, E.OPTIM_POST_STEP), E.LOSS_CALCULATED),
        ((E.BATCH_START, E.LOSS_CALCULATED), E.BATCH_START),
        ((E.BATCH_START,), E.CALIBRATION_EPOCH_START),
        ((E.CALIBRATION_EPOCH_START,), E.BATCH_START),
        ((E.CALIBRATION_EPOCH_START, E.SEQUENTIAL_EPOCH_END), E.BATCH_END),
    ],
)
def test_an_optimizer_step_and_a_batch_are_not_cut_short(after, refused):
    """Between OPTIM_PRE_STEP and BATCH_END comes OPTIM_POST_STEP, which is what advances the
    step of a watched optimizer: a BATCH_END straight after OPTIM_PRE_STEP would lose it."""
    lifecycle = Lifecycle(counts_optimizer_steps=True)
    _advance(lifecycle, *after)
    with pytest.raises(EventOrderError, match=f"{refused.value} cannot follow {after[-1].value}"):
        lifecycle.advance(refused)
    assert lifecycle.last == after[-1]  # the refused event changed nothing


@pytest.mark.parametrize("field", ["steps_per_epoch", "batches_per_step"])
@pytest.mark.parametrize("value", [0, -2])
def test_counts_per_epoch_and_per_step_must_be_positive(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a positive int, got {value}"):
        Lifecycle(**{field: value})
    assert getattr(Lifecycle(**{field: 1}).event, field) == 1


def test_the_event_is_a_copy_of_the_counters():
    lifecycle = Lifecycle(batches_per_step=2)
    before = lifecycle.event
    _advance(lifecycle, E.BATCH_START, E.BATCH_END, E.BATCH_START, E.BATCH_END)
    assert (before.global_step, before.global_batch) == (0, 0)  # taken before the batches
    now = lifecycle.event
    assert (now.global_step, now.global_batch) == (1, 2)
    now.global_step = 40  # a modifier changing the event it got
    returned = lifecycle.advance(E.BATCH_START)
    returned.global_batch = 40
    assert (lifecycle.event.global_step, lifecycle.event.global_batch) == (1, 2)


@pytest.mark.parametrize(
    "batches_per_step, steps", [(None, [1, 2, 3, 4, 5, 6]), (3, [0, 0, 1, 1, 1, 2])]
)
def test_without_a_watched_optimizer_steps_follow_the_batches(batches_per_step, steps):
    lifecycle = Lifecycle(batches_per_step=batches_per_step)
    seen = []
    for _ in range(6):
        lifecycle.advance(E.BATCH_START)
        seen.append(lifecycle.advance(E.BATCH_END).global_step)
    assert seen == steps
    assert lifecycle.event.global_batch == 6


def test_a_watched_optimizer_counts_its_own_steps():
    lifecycle = Lifecycle(batches_per_step=2, counts_optimizer_steps=True)
    _advance(lifecycle, E.BATCH_START, E.BATCH_END, E.BATCH_START, E.BATCH_END)
    assert lifecycle.event.global_step == 0  # batch ends do not step
    _advance(lifecycle, E.BATCH_START, E.OPTIM_PRE_STEP, E.OPTIM_POST_STEP, E.BATCH_END)
    assert (lifecycle.event.global_step, lifecycle.event.global_batch) == (1, 3)


def test_the_callers_step_wins_and_counters_can_be_restored():
    lifecycle = Lifecycle(steps_per_epoch=4)
    assert lifecycle.advance(E.BATCH_START, global_step=9).global_step == 9
    assert lifecycle.event.epoch == 2
    lifecycle.set_counters(global_step=3, global_batch=7)
    assert (lifecycle.event.global_step, lifecycle.event.global_batch) == (3, 7)
    for step, batch in [(-1, 0), (0, -1)]:
        with pytest.raises(ValueError, match=f"global_step={step}, global_batch={batch}"):
            lifecycle.set_counters(global_step=step, global_batch=batch)
    lifecycle.set_counters(global_step=0, global_batch=0)  # zero is a fresh run
    assert lifecycle.event.global_step == 0


def test_a_resumed_run_starts_at_its_offset():
    assert Lifecycle(start=5).event.global_step == 5
    resumed = Lifecycle(steps_per_epoch=4, batches_per_step=2, start=1.5).event
    assert (resumed.global_step, resumed.global_batch) == (6, 12)
    assert Lifecycle().event.global_step == 0
