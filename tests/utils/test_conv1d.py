"""GPT-2's Conv1D layers converted to nn.Linear, compressed, and saved in their own layout."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from compressor import CompressionSession, Recipe, save_compressed
from compressor.utils.conv1d import conv1d_to_linear


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return GPT2LMHeadModel(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def test_conversion_keeps_the_function_and_leaves_no_conv1d():
    model = _gpt2()
    with torch.no_grad():
        before = model(_ids()).logits
    names = conv1d_to_linear(model)
    assert len(names) == 8  # c_attn, attn c_proj, c_fc, mlp c_proj per layer
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    assert isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)
    with torch.no_grad():
        assert torch.allclose(model(_ids()).logits, before, atol=1e-6)


def _train(model, recipe, steps=4):
    model.train()
    session = CompressionSession()
    session.initialize(model=model, recipe=recipe)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(steps):
        ids = _ids()
        session.batch_start()
        loss = session.loss_calculated(model(input_ids=ids, labels=ids).loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.batch_end()
    session.finalize()
    return model.eval()


W8A8 = {
    "weight_quantization": {
        "shared_parameters": {"enabled": True, "schedule_offset": 0, "quantize_groups": 8},
        "different_groups": {
            "wq1": {
                "params": {"start_bits": 8, "target_bits": 8},
                "modules": ["attn.c_attn", "attn.c_proj"],
            },
            "wq2": {
                "params": {"start_bits": 4, "target_bits": 4},
                "modules": ["mlp.c_fc", "mlp.c_proj"],
            },
        },
    },
    "activation_quantization": {
        "shared_parameters": {
            "enabled": True,
            "schedule_offset": 0,
            "range_calibration": "dynamic",
        },
        "different_groups": {
            "aq1": {
                "params": {"bits": 8},
                "modules": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
            }
        },
    },
}


def test_a_gpt2_deepspeed_config_needs_the_conversion_and_then_runs(tmp_path):
    recipe = Recipe.from_deepspeed({"compression_training": W8A8})
    with pytest.raises(ValueError, match="conv1d_to_linear"):
        CompressionSession().initialize(model=_gpt2(), recipe=recipe)
    model = _gpt2()
    conv1d_to_linear(model)
    _train(model, Recipe.from_deepspeed({"compression_training": W8A8}))
    fc = model.transformer.h[0].mlp.c_fc
    assert fc.quantization_scheme.weights.num_bits == 4
    assert fc.quantization_scheme.input_activations.num_bits == 8
    # a quantized Conv1D layer has no checkpoint format: refused before anything is written
    with pytest.raises(ValueError, match="Conv1D"):
        save_compressed(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pruned_gpt2_is_saved_in_the_conv1d_layout_and_reloads(tmp_path):
    model = _gpt2()
    conv1d_to_linear(model)
    config = {
        "sparse_pruning": {
            "shared_parameters": {"enabled": True, "schedule_offset": 0, "method": "l1"},
            "different_groups": {"sp1": {"params": {"dense_ratio": 0.5}, "modules": ["mlp.c_fc"]}},
        }
    }
    _train(model, Recipe.from_deepspeed({"compression_training": config}))
    fc = model.transformer.h[1].mlp.c_fc
    assert (fc.weight == 0).float().mean() == pytest.approx(0.5, abs=0.02)
    save_compressed(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded.transformer.h[1].mlp.c_fc).__name__ == "Conv1D"
    with torch.no_grad():
        assert torch.allclose(reloaded(_ids()).logits, model(_ids()).logits, atol=1e-5)
    # the in-memory model keeps its Linear layout
    assert fc.weight.shape == (128, 32)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gpt2"
