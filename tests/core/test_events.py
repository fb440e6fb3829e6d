import pytest
import torch

from compressor.core import Event, EventType


def test_event_type_values():
    expected = {
        "INITIALIZE": "initialize",
        "FINALIZE": "finalize",
        "BATCH_START": "batch_start",
        "LOSS_CALCULATED": "loss_calculated",
        "BATCH_END": "batch_end",
        "CALIBRATION_EPOCH_START": "calibration_epoch_start",
        "SEQUENTIAL_EPOCH_END": "sequential_epoch_end",
        "CALIBRATION_EPOCH_END": "calibration_epoch_end",
        "OPTIM_PRE_STEP": "optim_pre_step",
        "OPTIM_POST_STEP": "optim_post_step",
    }
    assert {m.name: m.value for m in EventType} == expected


@pytest.mark.parametrize(
    "kwargs, epoch_based, epoch, epoch_full, epoch_step, epoch_batch, current_index",
    [
        (dict(steps_per_epoch=10, global_step=25, global_batch=25), True, 2, 2.5, 5, 5, 2.5),
        (dict(steps_per_epoch=10, global_step=9, global_batch=9), True, 0, 0.9, 9, 9, 0.9),
        # 8 batches an epoch under accumulation: 13 % 8, where 4 batches would give 13 % 4
        (
            dict(steps_per_epoch=4, batches_per_step=2, global_step=6, global_batch=13),
            True,
            1,
            1.5,
            2,
            5,
            1.5,
        ),
        (dict(steps_per_epoch=3, global_step=0), True, 0, 0.0, 0, 0, 0.0),
    ],
)
def test_epoch_properties(
    kwargs, epoch_based, epoch, epoch_full, epoch_step, epoch_batch, current_index
):
    event = Event(**kwargs)
    assert event.epoch_based is epoch_based
    assert event.epoch == epoch
    assert event.epoch_full == pytest.approx(epoch_full)
    assert event.epoch_step == epoch_step
    assert event.epoch_batch == epoch_batch
    assert event.current_index == pytest.approx(current_index)


@pytest.mark.parametrize("prop", ["epoch", "epoch_full", "epoch_step", "epoch_batch"])
def test_epoch_properties_raise_without_steps_per_epoch(prop):
    event = Event(global_step=7)
    assert not event.epoch_based
    assert event.current_index == 7
    with pytest.raises(ValueError, match="steps_per_epoch"):
        getattr(event, prop)


@pytest.mark.parametrize(
    "kwargs, value, global_step, global_batch",
    [
        (dict(), 7, 7, 7),
        (dict(), 7.9, 7, 7),
        (dict(steps_per_epoch=10), 1.5, 15, 15),
        (dict(steps_per_epoch=10, batches_per_step=4), 0.5, 5, 20),
        (dict(batches_per_step=1), 3, 3, 3),
        (dict(batches_per_step=2), 3, 3, 6),
    ],
)
def test_current_index_setter(kwargs, value, global_step, global_batch):
    event = Event(**kwargs)
    event.current_index = value
    assert (event.global_step, event.global_batch) == (global_step, global_batch)


@pytest.mark.parametrize(
    "kwargs, start, end, update, expected",
    [
        (dict(global_step=5), None, None, None, True),
        (dict(global_step=5), 6, None, None, False),
        (dict(global_step=5), 5, None, None, True),
        (dict(global_step=5), None, 4, None, False),
        (dict(global_step=5), None, 5, None, True),
        (dict(global_step=6), 0, 10, 3, True),
        (dict(global_step=7), 0, 10, 3, False),
        (dict(global_step=7), 0, 10, 0, True),
        (dict(global_step=7), 0, 10, -1, True),
        (dict(global_step=15, steps_per_epoch=10), 1, 2, 0.5, True),
        (dict(global_step=14, steps_per_epoch=10), 1, 2, 0.5, False),
        (dict(global_step=25, steps_per_epoch=10), 1, 2, None, False),
        # every 0.1 epoch: 0.3 / 0.1 and 0.7 / 0.1 fall just below 3 and 7 in binary
        (dict(global_step=3, steps_per_epoch=10), None, None, 0.1, True),
        (dict(global_step=7, steps_per_epoch=10), None, None, 0.1, True),
        (dict(global_step=5, steps_per_epoch=20), None, None, 0.1, False),
        (dict(global_step=10, steps_per_epoch=3), None, None, 0.1, False),
    ],
)
def test_should_update(kwargs, start, end, update, expected):
    assert Event(**kwargs).should_update(start, end, update) is expected


def test_new_instance_is_a_changed_copy():
    event = Event(type_=EventType.BATCH_START, steps_per_epoch=3, global_step=2)
    copy = event.new_instance(type_=EventType.BATCH_END, global_batch=9)
    assert copy is not event
    assert (copy.type_, copy.global_batch, copy.global_step) == (EventType.BATCH_END, 9, 2)
    assert (event.type_, event.global_batch) == (EventType.BATCH_START, 0)
    with pytest.raises(TypeError, match="no field"):
        event.new_instance(step=3)


def test_new_instance_carries_the_very_modules_not_copies():
    """A SEQUENTIAL_EPOCH_END's modules are the model's own: a modifier compressing a copy
    would leave the model unchanged."""
    layer = torch.nn.Linear(4, 4)
    stage = (torch.nn.Linear(4, 2), torch.nn.Linear(4, 2))
    event = Event(type_=EventType.SEQUENTIAL_EPOCH_END, modules=(layer,))
    copy = event.new_instance(global_step=5)
    assert copy.modules[0] is layer
    assert event.global_step == 0  # the counters are the copy's own
    changed = copy.new_instance(modules=stage)
    assert all(got is want for got, want in zip(changed.modules, stage, strict=True))
    assert copy.modules[0] is layer
    assert Event().modules == ()
