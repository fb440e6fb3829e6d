import threading
from pathlib import Path

import pytest
import torch

from compressor import CompressionSession, Recipe, active_session, create_session
from compressor.core import EventOrderError, EventType
from recording import RecordingModifier

RECIPE = """
train_stage:
  record_modifiers:
    RecordingModifier: {tag: early, start: 1, end: 3}
    Recorder: {tag: late, start: 2}
"""


def _train(model, batches, session, optimizer, accumulate=1):
    for i, batch in enumerate(batches):
        session.batch_start(batch_data=batch)
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        loss = session.loss_calculated(out.loss)
        (loss / accumulate).backward()
        if (i + 1) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
        session.batch_end()


def test_plain_loop_as_in_the_readme(tiny_llama, token_batches, tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(RECIPE)
    model = tiny_llama.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = token_batches  # 4 batches
    session = CompressionSession()
    session.initialize(
        model=model,
        recipe=Recipe.from_file(recipe_file),
        optimizer=opt,
        steps_per_epoch=len(loader),
    )
    for _epoch in range(2):
        for batch in loader:
            session.batch_start(batch_data=batch)
            loss = session.loss_calculated(model(**batch, labels=batch["input_ids"]).loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
            session.batch_end()
    session.finalize()
    early, late = session.modifiers
    # epoch based: start 1 epoch = step 4, end 3 epochs = beyond the run (8 steps)
    assert early.steps("start") == [4]
    assert [t for t, _, _ in early.calls("end")] == ["finalize"]
    # start 2 epochs = step 8, reached only by the last batch's end: nothing runs after it
    assert late.steps("start") == []
    # the optimizer events fired by themselves, carrying the step count
    pre = [s for t, s, _ in early.calls("event") if t == "optim_pre_step"]
    post = [s for t, s, _ in early.calls("event") if t == "optim_post_step"]
    assert pre == list(range(8)) and post == list(range(1, 9))
    assert early.finalized and late.finalized


def test_step_offsets_with_an_optimizer(tiny_llama, token_batches):
    model = tiny_llama.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    session = CompressionSession()
    session.initialize(model=model, recipe=Recipe.from_yaml(RECIPE), optimizer=opt)
    _train(model, token_batches, session, opt)
    session.finalize()
    early, late = session.modifiers
    assert early.steps("start") == [1] and early.steps("end") == [3]
    assert late.steps("start") == [2]
    assert [(t, s) for t, s, _ in late.calls("end")] == [("finalize", 0)]


def test_gradient_accumulation_counts_optimizer_steps(tiny_llama):
    model = tiny_llama.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 128, (1, 8), generator=gen)} for _ in range(12)]
    session = CompressionSession()
    session.initialize(
        model=model, recipe=Recipe.from_yaml(RECIPE), optimizer=opt, batches_per_step=3
    )
    _train(model, batches, session, opt, accumulate=3)
    session.finalize()
    early, _ = session.modifiers
    # 12 micro-batches, 4 optimizer steps: start at step 1 = the 4th batch, end at step 3
    assert early.calls("start") == [("batch_start", 1, 3)]
    assert early.calls("end") == [("batch_end", 3, 9)]
    assert session.event.global_step == 4 and session.event.global_batch == 12


def test_without_optimizer_steps_follow_batches_per_step():
    session = CompressionSession()
    session.initialize(
        model=torch.nn.Linear(2, 2), recipe=Recipe.from_yaml(RECIPE), batches_per_step=2
    )
    for _ in range(6):
        session.batch_start()
        session.batch_end()
    assert session.event.global_step == 3 and session.event.global_batch == 6
    early, late = session.modifiers
    assert early.calls("start") == [("batch_start", 1, 2)]
    session.finalize()


def test_start_offset_reaches_the_events():
    session = CompressionSession()
    session.initialize(model=torch.nn.Linear(2, 2), recipe=Recipe.from_yaml(RECIPE), start=2)
    early, late = session.modifiers
    assert early.steps("start") == [2] and late.steps("start") == [2]
    event = session.batch_start()
    assert event.global_step == 2
    session.batch_end()
    session.finalize()


def test_loss_calculated_returns_the_changed_loss():
    session = CompressionSession()
    session.initialize(
        model=torch.nn.Linear(2, 2), recipe=[RecordingModifier(start=0, scale_loss=0.5)]
    )
    session.batch_start()
    assert session.loss_calculated(torch.tensor(4.0)).item() == 2.0
    session.batch_end()
    session.finalize()


@pytest.mark.parametrize(
    "calls, message",
    [
        (["batch_end"], "batch_end cannot follow initialize: expected one of batch_start"),
        (["batch_start", "batch_start"], "expected one of batch_end, loss_calculated"),
        (["batch_start", "optim_post_step"], "optim_post_step cannot follow batch_start"),
        (["calibration_epoch_start", "batch_start"], "expected one of calibration_epoch_end"),
        (["calibration_epoch_end"], "cannot follow initialize"),
    ],
)
def test_events_out_of_order_name_the_expected_event(calls, message):
    session = CompressionSession()
    session.initialize(model=torch.nn.Linear(2, 2), recipe=[RecordingModifier()])
    with pytest.raises(EventOrderError, match=message):
        for name in calls:
            getattr(session, name)()


def test_optimizer_hooks_are_removed_at_finalize():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = CompressionSession()
    session.initialize(model=model, recipe=[RecordingModifier(start=0)], optimizer=opt)
    assert opt._optimizer_step_pre_hooks and opt._optimizer_step_post_hooks
    session.finalize()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    opt.step()  # no session events any more
    with pytest.raises(RuntimeError, match="finalized"):
        session.batch_start()


def test_session_misuse():
    session = CompressionSession()
    with pytest.raises(RuntimeError, match="not initialized"):
        session.batch_start()
    # a str that names no file and holds no newline: refused, as by oneshot
    with pytest.raises(ValueError, match="recipe='recipe.yaml' is neither"):
        session.initialize(model=torch.nn.Linear(2, 2), recipe="recipe.yaml")
    session.initialize(model=torch.nn.Linear(2, 2), recipe=[RecordingModifier()])
    with pytest.raises(RuntimeError, match="already initialized"):
        session.initialize(model=torch.nn.Linear(2, 2), recipe=[RecordingModifier()])


def test_recipe_path_is_accepted(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    session = CompressionSession()
    session.initialize(model=torch.nn.Linear(2, 2), recipe=Path(path))
    assert [m.tag for m in session.modifiers] == ["early", "late"]


def test_a_failing_initialize_finalizes_the_modifiers_already_initialized():
    class Failing(RecordingModifier):
        def on_initialize(self, state):
            raise ValueError("does not fit")

    first = RecordingModifier()
    session = CompressionSession()
    with pytest.raises(ValueError, match="does not fit"):
        session.initialize(model=torch.nn.Linear(2, 2), recipe=[first, Failing()])
    assert first.finalized
    assert not session.initialized


def test_a_failing_initialize_stops_watching_the_optimizer_and_can_be_retried():
    class Failing(RecordingModifier):
        def on_initialize(self, state):
            raise ValueError("does not fit")

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    session = CompressionSession()
    with pytest.raises(ValueError, match="does not fit"):
        session.initialize(model=model, recipe=[Failing()], optimizer=optimizer)
    optimizer.step()  # a hook left behind would dispatch into the uninitialized session
    session.initialize(model=model, recipe=[RecordingModifier()], optimizer=optimizer)
    assert session.initialized


def test_finalize_finalizes_every_modifier_even_when_one_fails():
    class Failing(RecordingModifier):
        def on_finalize(self, state):
            raise ValueError("finalize failed")

    last = RecordingModifier()
    session = CompressionSession()
    session.initialize(model=torch.nn.Linear(2, 2), recipe=[Failing(), last])
    with pytest.raises(ValueError, match="finalize failed"):
        session.finalize()
    assert last.finalized


def test_active_session_per_thread():
    default = active_session()
    assert active_session() is default
    seen = {}

    def worker(name):
        with create_session() as session:
            seen[name] = (session, active_session())

    with create_session() as outer:
        assert active_session() is outer
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert active_session() is outer
    assert active_session() is default
    assert all(a is b for a, b in seen.values())
    assert len({id(a) for a, _ in seen.values()}) == 4


def test_calibration_events_run_post_training_modifiers():
    session = CompressionSession()
    mod = RecordingModifier()
    session.initialize(model=torch.nn.Linear(2, 2), recipe=[mod])
    session.calibration_epoch_start()
    layer = torch.nn.Linear(2, 2)
    session.sequential_epoch_end(layer)
    session.calibration_epoch_end()
    session.finalize()
    assert [t for t, _, _ in mod.calls("update")] == [
        EventType.CALIBRATION_EPOCH_START.value,
        EventType.SEQUENTIAL_EPOCH_END.value,
        EventType.CALIBRATION_EPOCH_END.value,
    ]
    assert mod.ended and mod.finalized


def test_the_calibrated_modules_travel_in_the_event_not_in_the_state():
    """SEQUENTIAL_EPOCH_END carries the very modules just calibrated (one, or a stage's
    several); the state's batch_data keeps the training batch throughout."""
    from compressor.modifiers import Modifier

    seen = []

    class Probe(Modifier):
        def on_event(self, state, event):
            if event.type_ == EventType.SEQUENTIAL_EPOCH_END:
                seen.append((event.modules, state.batch_data))

    session = CompressionSession()
    session.initialize(model=torch.nn.Linear(2, 2), recipe=[Probe()])
    session.state.batch_data = batch = {"input_ids": torch.zeros(1, 2)}
    layer, stage = torch.nn.Linear(2, 2), [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    session.calibration_epoch_start()
    session.sequential_epoch_end(layer)
    session.sequential_epoch_end(stage)
    session.calibration_epoch_end()
    session.finalize()
    (one, batch_one), (several, batch_several) = seen
    assert len(one) == 1 and one[0] is layer
    assert len(several) == 2 and all(a is b for a, b in zip(several, stage, strict=True))
    assert batch_one is batch and batch_several is batch
    assert session.event.modules == ()


def test_the_data_to_learn_from_travels_in_the_start_events_only():
    """CALIBRATION_EPOCH_START carries the pipeline's batches, a training run's INITIALIZE
    (and the start it triggers) the batches given to initialize; no other event does."""
    from compressor.modifiers import Modifier

    seen = []

    class Probe(Modifier):
        def on_start(self, state, event):
            seen.append(("start", event.type_, event.batches))

        def on_event(self, state, event):
            seen.append(("event", event.type_, event.batches))

    calibration = [{"input_ids": torch.zeros(1, 2, dtype=torch.long)}]
    session = CompressionSession()
    session.initialize(model=torch.nn.Linear(2, 2), recipe=[Probe()])
    session.calibration_epoch_start(calibration)
    session.sequential_epoch_end(torch.nn.Linear(2, 2))
    session.calibration_epoch_end()
    session.finalize()
    carried = [(kind, type_) for kind, type_, batches in seen if batches is calibration]
    assert carried == [
        ("event", EventType.CALIBRATION_EPOCH_START),
        ("start", EventType.CALIBRATION_EPOCH_START),
    ]
    assert all(batches == () for _, _, batches in seen if batches is not calibration)

    seen.clear()
    training = [{"input_ids": torch.ones(1, 2, dtype=torch.long)}]
    session = CompressionSession()
    session.initialize(model=torch.nn.Linear(2, 2), recipe=[Probe(start=0)], batches=training)
    session.batch_start()
    session.batch_end()
    session.finalize()
    assert seen[0] == ("start", EventType.BATCH_START, training)
    assert all(batches == () for _, _, batches in seen[1:])
