"""The Trainer examples run end to end on a tiny Llama and do what they say."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import tiny_llama_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WINDOW, STEPS = 16, 4


@pytest.fixture
def examples_path():
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


def _tiny(steps=STEPS):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    ids = torch.randint(
        0, 128, (WINDOW * (steps * 8 + 4),), generator=torch.Generator().manual_seed(0)
    )
    return model, ids


def test_qat_with_progressive_bits(tmp_path, examples_path):
    import trainer_qat_progressive as example

    model, ids = _tiny()
    out = example.run(model, ids, tmp_path, steps=STEPS, window=WINDOW)
    assert all(v > 1.0 for k, v in out.items() if k != "saved")
    layer = model.model.layers[0].mlp.down_proj
    assert layer.quantization_scheme.weights.num_bits == 4  # at the target bits when it ended
    reloaded = LlamaForCausalLM.from_pretrained(out["saved"]).eval()
    x = ids[:WINDOW][None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model.eval()(x).logits, rtol=1e-3, atol=1e-3)


def test_gradual_magnitude_pruning(tmp_path, examples_path):
    import trainer_gradual_pruning as example

    model, ids = _tiny(steps=8)
    out = example.run(model, ids, tmp_path, steps=8, window=WINDOW)
    assert out["densities"] and all(
        d == pytest.approx(0.5, abs=0.02) for d in out["densities"].values()
    )
    reloaded = LlamaForCausalLM.from_pretrained(out["saved"])
    assert example.density_of(reloaded) == out["densities"]


def test_topk_head_and_row_pruning_saves_a_smaller_model(tmp_path, examples_path):
    import trainer_topk_structured as example

    model, ids = _tiny()
    out = example.run(model, ids, tmp_path, steps=STEPS, window=WINDOW)
    assert out["before"]["intermediate_size"] == 64 and out["after"]["intermediate_size"] == 32
    assert out["before"]["num_key_value_heads"] == 2 and out["after"]["num_key_value_heads"] == 1
    assert out["after"]["params"] < out["before"]["params"]
    x = ids[:WINDOW][None]
    with torch.no_grad():
        torch.testing.assert_close(out["reloaded"].eval()(x).logits, out["model"].eval()(x).logits)


def test_layer_reduction_with_distillation_saves_a_shallower_model(tmp_path, examples_path):
    import trainer_layer_reduction_distillation as example

    _, ids = _tiny()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4))
    out = example.run(model, ids, tmp_path, steps=STEPS, window=WINDOW)
    assert out["teacher"]["layers"] == 4 and out["before"]["layers"] == 2
    assert out["reloaded"].config.num_hidden_layers == 2 == len(out["reloaded"].model.layers)
    assert out["after"]["params"] < out["teacher"]["params"]
    assert out["after"]["kl"] < out["before"]["kl"]  # distillation moved it to the teacher
    x = ids[:WINDOW][None]
    with torch.no_grad():
        torch.testing.assert_close(out["reloaded"].eval()(x).logits, out["model"].eval()(x).logits)
