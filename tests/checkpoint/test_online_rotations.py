"""Online rotations (SpinQuant's R4) saved in compressed-tensors' transform_config and put back
on a reloaded model, which then equals the in-memory one."""

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.transform.factory.base import TransformBase
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from compressor import Recipe, oneshot
from compressor.checkpoint import restore_online_rotations
from compressor.entrypoints.loading import load_model
from compressor.modifiers import QuantizationModifier, SpinQuantModifier
from conftest import tiny_llama_config

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
RECIPES = Path(__file__).parents[1] / "recipe" / "data" / "llmcompressor"


def _llama(hidden_size=64, **overrides):
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=hidden_size, num_attention_heads=4, **overrides)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _w4a8(**extra):
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}
    activations = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token"}
    return QuantizationModifier(
        ignore=["lm_head"],
        config_groups={
            "g": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": {**activations, "dynamic": True},
            }
        },
        **extra,
    )


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _transforms(model):
    return [name for name, m in model.named_modules() if isinstance(m, TransformBase)]


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("width, kind", [(128, "hadamard"), (172, "random-hadamard")])
def test_saved_r4_reloads_equal_to_the_in_memory_model(tmp_path, quantized, width, kind):
    model = _llama(intermediate_size=width)
    recipe = [SpinQuantModifier(rotations=["R1", "R2", "R4"])]
    if quantized:
        recipe.append(_w4a8())
    oneshot(model=model, recipe=recipe)
    expected = _logits(model)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    scheme = saved["transform_config"]["config_groups"]["R4"]
    assert scheme["type"] == kind
    assert [a["location"] for a in scheme["apply"]] == ["input", "weight_input"]
    assert ("config_groups" in saved) is quantized

    reloaded = load_model(tmp_path, compressed_ok=True)
    assert _transforms(reloaded) == _transforms(model)
    torch.testing.assert_close(_logits(reloaded), expected, atol=1e-4, rtol=0)


def test_transformers_alone_drops_the_rotations_and_restore_puts_them_back(tmp_path):
    model = _llama(intermediate_size=128)
    oneshot(model=model, recipe=[SpinQuantModifier(rotations=["R4"])])
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    # transformers 5.24 keeps no transform_config: without the rotation down_proj reads x
    # through a weight that expects x @ H, so the model differs
    assert not _transforms(plain)
    assert (_logits(plain) - expected).abs().max() > 1e-3
    assert restore_online_rotations(plain, tmp_path)
    assert not restore_online_rotations(plain, tmp_path)  # already there: nothing to do
    torch.testing.assert_close(_logits(plain), expected, atol=1e-4, rtol=0)


def test_restore_uses_the_saved_matrices(tmp_path):
    model = _llama(intermediate_size=172)
    oneshot(model=model, recipe=[SpinQuantModifier(rotations=["R4"])])
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    config = json.loads((tmp_path / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    (key,) = [k for k in tensors if k.endswith("R4_input.weight")]
    tensors[key] = -tensors[key]  # still a Hadamard matrix, but not the one rebuilt
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert config["quantization_config"]["transform_config"]
    restore_online_rotations(plain, tmp_path)
    (transform,) = {
        id(m.weight): m for m in plain.modules() if isinstance(m, TransformBase)
    }.values()
    torch.testing.assert_close(transform.weight, tensors[key].to(transform.weight.dtype))


def test_llm_compressor_recipe_with_r4_and_a_block_size_runs_unchanged(tmp_path):
    recipe = Recipe.from_file(RECIPES / "spinquant_r4_w4a16.yaml")
    spin = recipe.modifiers[0]
    assert isinstance(spin, SpinQuantModifier) and spin.transform_block_size == 16
    model = _llama(hidden_size=128, intermediate_size=256)
    unrotated = _llama(hidden_size=128, intermediate_size=256)
    oneshot(model=model, recipe=recipe)
    scheme = model.transform_config.config_groups["R4"]
    assert scheme.head_dim == 16 and scheme.type == "hadamard"
    # W4A16 groups of 128 on a model rotated exactly: close to the unrotated model
    assert (_logits(model) - _logits(unrotated)).abs().max() < 0.5
    model.save_pretrained(tmp_path)
    reloaded = load_model(tmp_path, compressed_ok=True)
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=1e-4, rtol=0)


def test_r3_with_a_quantized_cache_reloads_equal(tmp_path):
    from datasets import Dataset

    model = _llama(intermediate_size=128)
    kv = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
    quant = _w4a8(kv_cache_scheme=kv)
    data = Dataset.from_dict({"input_ids": [row.tolist() for row in IDS]})
    oneshot(model=model, recipe=[SpinQuantModifier(rotations=["R1", "R2", "R3", "R4"]), quant],
            dataset=data)  # fmt: skip
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert list(saved["transform_config"]["config_groups"]) == ["R3", "R4"]
    assert saved["kv_cache_scheme"]["num_bits"] == 8
    reloaded = load_model(tmp_path, compressed_ok=True)
    assert reloaded.model.layers[1].self_attn.R3_k_cache is not None
    torch.testing.assert_close(_logits(reloaded), expected, atol=1e-4, rtol=0)
