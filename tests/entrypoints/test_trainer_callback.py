"""The Trainer callback: events and offsets under gradient accumulation, epochs, the loss,
parameters added by modifiers, resuming, and the saved result."""

from __future__ import annotations

import pytest
import torch
from pydantic import PrivateAttr
from transformers import LlamaForCausalLM, Trainer

from compressor import CompressionCallback, CompressionSession, CompressionTrainer, Modifier
from compressor.entrypoints.trainer import COMPRESSOR_STATE_NAME
from recording import RecordingModifier
from training_runs import BATCH, SAMPLES, OutputScaleModifier
from training_runs import dataset as _dataset
from training_runs import make_trainer as _trainer
from training_runs import model as _model


def _plain_loop_events(recipe, accumulation, epochs, with_loss):
    """The events a plain loop with the same data, batches and accumulation sends."""
    model = _model().train()
    data = _dataset()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    session = CompressionSession()
    session.initialize(model=model, recipe=recipe, optimizer=opt, batches_per_step=accumulation)
    batches = [data[i : i + BATCH] for i in range(0, SAMPLES, BATCH)]
    for _ in range(epochs):
        for i, rows in enumerate(batches):
            session.batch_start()
            if with_loss:
                ids = torch.stack([r["input_ids"] for r in rows])
                session.loss_calculated(model(input_ids=ids, labels=ids).loss)
            if (i + 1) % accumulation == 0 or i + 1 == len(batches):
                opt.step()
            session.batch_end()
    session.finalize()
    return session.modifiers[0]


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("cls", [Trainer, CompressionTrainer])
def test_events_and_offsets_match_a_plain_loop(tmp_path, accumulation, cls):
    recipe = [RecordingModifier(start=1, end=3)]
    callback = CompressionCallback(recipe)
    _trainer(_model(), callback, tmp_path, cls=cls, accumulation=accumulation).train()
    (recorder,) = callback.modifiers
    # start and end at the right optimizer steps; global_batch counts micro-batches
    assert recorder.calls("start") == [("batch_start", 1, accumulation)]
    assert recorder.calls("end") == [("batch_end", 3, 3 * accumulation)]
    steps = 8 // accumulation
    post = [s for t, s, _ in recorder.calls("event") if t == "optim_post_step"]
    assert post == list(range(1, steps + 1))
    assert recorder.finalized and not callback.active
    expected = _plain_loop_events(
        [RecordingModifier(start=1, end=3)], accumulation, 2, cls is CompressionTrainer
    )
    assert recorder.calls("event") == expected.calls("event")
    assert recorder.calls("update") == expected.calls("update")


@pytest.mark.parametrize("offsets, start, end", [("steps", 1, 2), ("epochs", 2, 4)])
def test_epoch_offsets_count_optimizer_steps_per_epoch(tmp_path, offsets, start, end):
    # 4 micro-batches per epoch with accumulation 2: 2 optimizer steps per epoch
    callback = CompressionCallback([RecordingModifier(start=1, end=2)], offsets=offsets)
    _trainer(_model(), callback, tmp_path, accumulation=2, num_train_epochs=3).train()
    (recorder,) = callback.modifiers
    assert recorder.steps("start") == [start] and recorder.steps("end") == [end]


def test_offsets_are_validated():
    with pytest.raises(ValueError, match="offsets must be one of steps, epochs; got 'batches'"):
        CompressionCallback([RecordingModifier()], offsets="batches")


def test_the_loss_passes_through_the_recipe_with_the_trainer_subclass(tmp_path):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    callback = CompressionCallback([RecordingModifier(start=0, scale_loss=0.0)])
    trainer = _trainer(model, callback, tmp_path, cls=CompressionTrainer, optim="sgd")
    out = trainer.train()
    assert out.training_loss == 0.0
    # a zero loss: no gradient, so SGD left every weight as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    trainer.evaluate(eval_dataset=_dataset()[:2])  # evaluation sends no events


def test_the_callback_alone_runs_modifiers_without_the_loss(tmp_path):
    callback = CompressionCallback([RecordingModifier(start=0, scale_loss=0.0)])
    out = _trainer(_model(), callback, tmp_path).train()
    assert out.training_loss > 1.0
    (recorder,) = callback.modifiers
    assert not [t for t, _, _ in recorder.calls("event") if t == "loss_calculated"]
    assert recorder.steps("update")


def test_parameters_added_by_modifiers_reach_the_optimizer(tmp_path):
    callback = CompressionCallback([OutputScaleModifier(start=1)])
    model = _model()
    trainer = _trainer(model, callback, tmp_path, lr_scheduler_type="linear", warmup_steps=0)
    trainer.train()
    (modifier,) = callback.modifiers
    assert modifier._scale is not None and modifier._scale.item() != 1.0  # it was trained
    groups = trainer.optimizer.param_groups
    assert any(p is modifier._scale for p in groups[-1]["params"])
    assert groups[-1]["lr"] == groups[0]["lr"]  # scheduled like the other parameters
    assert not hasattr(model.lm_head, "compress_scale")  # folded in at finalize


@Modifier.register()
class CountingModifier(RecordingModifier):
    """Counts its updates; the count is checkpoint state."""

    _count: int = PrivateAttr(default=0)

    def on_update(self, state, event):
        super().on_update(state, event)
        self._count += 1

    def state_dict(self):
        return {"count": self._count}

    def load_state_dict(self, state_dict):
        self._count = state_dict["count"]


def test_resuming_continues_the_schedule_and_the_modifier_state(tmp_path):
    settings = dict(accumulation=2, num_train_epochs=3, save_strategy="steps", save_steps=2)
    full = CompressionCallback([CountingModifier(start=1, end=5)])
    _trainer(_model(), full, tmp_path / "full", **settings).train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert (checkpoint / COMPRESSOR_STATE_NAME).is_file()

    resumed = CompressionCallback([CountingModifier(start=1, end=5)], resume_from=checkpoint)
    _trainer(_model(), resumed, tmp_path / "resumed", **settings).train(
        resume_from_checkpoint=str(checkpoint)
    )
    (done,), (again,) = full.modifiers, resumed.modifiers
    assert again.steps("end") == done.steps("end") == [5]
    assert again._count == done._count
    after = done.calls("event")
    after = after[after.index(("batch_start", 2, 4)) :]
    assert again.calls("event") == after


def test_resuming_without_compression_state_fails_clearly(tmp_path):
    settings = dict(num_train_epochs=1, save_strategy="steps", save_steps=2)
    _trainer(_model(), CompressionCallback([RecordingModifier()]), tmp_path, **settings).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    (checkpoint / COMPRESSOR_STATE_NAME).unlink()
    trainer = _trainer(_model(), CompressionCallback([RecordingModifier()]), tmp_path, **settings)
    with pytest.raises(FileNotFoundError, match="compressor_state.pt does not exist"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_save_model_after_training_reloads(tmp_path):
    callback = CompressionCallback([OutputScaleModifier(start=0)])
    model = _model()
    trainer = _trainer(model, callback, tmp_path, num_train_epochs=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "final").eval()
    ids = _dataset()[0]["input_ids"][None]
    with torch.no_grad():
        assert torch.allclose(model.eval()(ids).logits, reloaded(ids).logits, atol=1e-6)
