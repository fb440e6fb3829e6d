"""CompressionTrainer's checkpoints: parametrized weights saved under their plain names (so a
resumed run loads them), modifier state (observers, TopK scores, masks) restored on resume, and
a quantized model saved in compressed-tensors format."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, TrainerCallback

from compressor import CompressionCallback, CompressionTrainer
from compressor.entrypoints.trainer import COMPRESSOR_STATE_NAME
from compressor.modifiers import RowPruningModifier, SparsePruningModifier
from compressor.modifiers.quantization import QuantizationModifier
from training_runs import dataset, make_trainer, model

W8 = {"w8": {"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"}}}


def _qat():
    return [QuantizationModifier(config_groups=W8, ignore=["lm_head"], start=0)]


def test_qat_checkpoints_resume_to_the_uninterrupted_result(tmp_path):
    settings = dict(num_train_epochs=2, save_strategy="steps", save_steps=4)
    full = make_trainer(model(), CompressionCallback(_qat()), tmp_path / "a", CompressionTrainer,
                        **settings)  # fmt: skip
    full.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-4"
    keys = load_file(checkpoint / "model.safetensors").keys()
    assert "model.layers.0.mlp.down_proj.weight" in keys
    assert not [k for k in keys if "parametrizations" in k]

    again = make_trainer(model(), CompressionCallback(_qat()), tmp_path / "b", CompressionTrainer,
                         **settings)  # fmt: skip
    again.train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(
        full.model.state_dict().items(), again.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def test_save_model_writes_a_compressed_checkpoint_that_reloads(tmp_path):
    trainer = make_trainer(model(), CompressionCallback(_qat()), tmp_path, CompressionTrainer,
                           num_train_epochs=1)  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    config = (tmp_path / "final" / "config.json").read_text()
    assert "quantization_config" in config and (tmp_path / "final" / "recipe.yaml").is_file()
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "final").eval()
    ids = dataset()[0]["input_ids"][None]
    with torch.no_grad():
        expected = trainer.model.eval()(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_a_resumed_run_continues_the_bit_schedule_and_the_observers(tmp_path):
    # 8 -> 4 bits with period 1 (drops at steps 0, 1, 3, 7): 7 bits at step 0, 6 from 1, 5
    # from 3, 4 from 7, so the resume at step 4 lands between two drops;
    # static activation ranges keep being observed
    groups = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "channel"},
                    "input_activations": {"num_bits": 8, "strategy": "tensor"}}}  # fmt: skip

    def recipe():
        return [QuantizationModifier(config_groups=groups, ignore=["lm_head"], start=0,
                                     start_bits=8, target_bits=4, quantization_period=1)]  # fmt: skip

    settings = dict(num_train_epochs=2, save_strategy="steps", save_steps=4)
    full_cb = CompressionCallback(recipe())
    full = make_trainer(model(), full_cb, tmp_path / "a", CompressionTrainer, **settings)
    full.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-4"
    resumed_cb = CompressionCallback(recipe())
    again = make_trainer(model(), resumed_cb, tmp_path / "b", CompressionTrainer, **settings)
    again.train(resume_from_checkpoint=str(checkpoint))
    (done,), (resumed,) = full_cb.modifiers, resumed_cb.modifiers
    assert resumed.state_dict()["start_step"] == done.state_dict()["start_step"] == 0
    for (name, a), b in zip(
        full.model.state_dict().items(), again.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)


def _topk():
    attention = ["re:.*self_attn\\.(q|k|v|o)_proj"]
    return [
        # learnable per-weight scores, still training when the run is interrupted at step 4
        SparsePruningModifier(method="topk", targets=attention, init_density=0.9, density=0.5,
                              start=1, end=10, update=1),
        # learnable row scores, already frozen into masks by step 4
        RowPruningModifier(method="topk", density=0.5, start=0, end=3, shrink=False),
    ]  # fmt: skip


def test_a_resumed_topk_run_restores_scores_masks_and_optimizer_state(tmp_path):
    settings = dict(num_train_epochs=3, save_strategy="steps", save_steps=4)
    full_cb = CompressionCallback(_topk())
    full = make_trainer(model(), full_cb, tmp_path / "a", CompressionTrainer, **settings)
    full.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-4"
    saved = torch.load(checkpoint / COMPRESSOR_STATE_NAME, weights_only=True)
    sparse, rows = (entry["state"] for entry in saved["modifiers"])
    assert len(sparse["scores"]) == 8 and not sparse["frozen"]
    assert not rows["scores"] and rows["frozen"] and len(rows["masks"]) == 2

    resumed_cb = CompressionCallback(_topk())
    again = make_trainer(model(), resumed_cb, tmp_path / "b", CompressionTrainer, **settings)
    scores = {}

    def keep_score_objects():  # the scores the optimizer holds must be the restored ones
        sparse_modifier = resumed_cb.modifiers[0]
        scores.update({i: m[0].scores for i, m in sparse_modifier.scorer.score_masks.items()})

    again.add_callback(_AtTrainBegin(keep_score_objects))
    again.train(resume_from_checkpoint=str(checkpoint))
    held = {id(p) for group in again.optimizer.param_groups for p in group["params"]}
    assert scores and all(id(s) in held for s in scores.values())

    # the scores (and Adam's moments) went on training where they stopped: at step 8 the
    # resumed run's scores equal the uninterrupted run's
    at_8 = [torch.load(t / "out" / "checkpoint-8" / COMPRESSOR_STATE_NAME, weights_only=True)
            for t in (tmp_path / "a", tmp_path / "b")]  # fmt: skip
    first, second = (s["modifiers"][0]["state"] for s in at_8)
    for key, value in first["scores"].items():
        torch.testing.assert_close(second["scores"][key], value, msg=key)
    assert first["keep"] == second["keep"]
    for (name, a), b in zip(
        full.model.state_dict().items(), again.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
        assert torch.equal(a == 0, b == 0), name  # the same masks


class _AtTrainBegin(TrainerCallback):
    def __init__(self, call):
        self.call = call

    def on_train_begin(self, args, state, control, **kwargs):
        self.call()
