"""CompressionTrainer's checkpoints: parametrized weights saved under their plain names (so a
resumed run loads them), and a quantized model saved in compressed-tensors format."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from compressor import CompressionCallback, CompressionTrainer
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
    assert resumed._start_step == done._start_step == 0
    for (name, a), b in zip(
        full.model.state_dict().items(), again.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
