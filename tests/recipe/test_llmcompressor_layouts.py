"""llm-compressor recipes as llm-compressor writes and reads them: the recipe.yaml it saves
beside a checkpoint (bookkeeping fields), ``run_type``, a GPTQModifier that takes the scheme of
the QuantizationModifier before it, and its default of quantizing ``lm_head``."""

import json
from pathlib import Path

import pytest
import torch
from loguru import logger
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from compressor import Recipe, RecipeError, oneshot, save_compressed
from compressor.modifiers import GPTQModifier, QuantizationModifier
from compressor.recipe import llmcompressor
from conftest import tiny_llama_config

DATA = Path(__file__).parent / "data" / "llmcompressor"


@pytest.fixture
def llama128():
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def logs(monkeypatch):
    """INFO messages logged during the test; the once-per-process memory starts empty."""
    monkeypatch.setattr(llmcompressor, "_logged", set())
    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(str(m)), level="INFO")
    yield messages
    logger.remove(handle)


def _data(n=4, length=16):
    from datasets import Dataset

    gen = torch.Generator().manual_seed(0)
    return Dataset.from_dict({"input_ids": torch.randint(0, 128, (n, length), generator=gen)})


def test_saved_gptq_recipe_loads_and_its_bookkeeping_is_logged_once(llama128, logs, tmp_path):
    recipe = Recipe.from_file(DATA / "saved_gptq_w4a16.yaml")
    Recipe.from_file(DATA / "saved_gptq_w4a16.yaml")  # a second read logs nothing new
    (gptq,) = recipe.modifiers
    assert isinstance(gptq, GPTQModifier) and gptq.scheme == "W4A16"
    assert gptq.ignore == ["lm_head"] and gptq.actorder == "static"
    for field in ("batched_quantization", "bypass_divisibility_checks", "requires_calibration"):
        assert sum(f"llm-compressor's {field}" in m for m in logs) == 1, field
    model = oneshot(llama128, recipe, _data())
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        expected = model(ids).logits
    out = save_compressed(model, tmp_path / "ckpt")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_saved_fp8_dynamic_recipe_runs_without_data(llama128, logs):
    recipe = Recipe.from_file(DATA / "saved_fp8_dynamic.yaml")
    (quant,) = recipe.modifiers
    assert isinstance(quant, QuantizationModifier) and not quant.requires_calibration_data()
    model = oneshot(llama128, recipe)
    scheme = model.model.layers[0].mlp.up_proj.quantization_scheme
    assert scheme.input_activations.dynamic and scheme.input_activations.strategy == "token"
    assert any("requires_calibration_data=False has no effect" in m for m in logs)


def _quant(fields: str, name: str = "QuantizationModifier", scheme: str = "W4A16") -> str:
    return f"s_stage:\n  q_modifiers:\n    {name}: {{scheme: {scheme}, {fields}}}\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (_quant("bypass_divisibility_checks: true"), "bypass_divisibility_checks: got True"),
        (_quant("requires_calibration_data: true"), "does not need calibration data"),
        (_quant("requires_calibration_data: false", "GPTQModifier"), "needs calibration data"),
        (_quant("batched_quantization: -1", "GPTQModifier"), "'auto', a positive integer"),
        (_quant("batched_quantization: 4"), "QuantizationModifier -> batched_quantization"),
        (_quant("weight_observer: mse"), "overriding the scheme's observer"),
        (_quant("observer: {weights: mse}"), "mapping of roles to observer names"),
        (
            "s_stage:\n  run_type: calibrate\n  q_modifiers:\n    GPTQ: {scheme: W4A16}\n",
            "run_type",
        ),
        (
            "s_stage:\n  q_modifiers:\n    GPTQModifier: {block_size: 64}\n",
            "no QuantizationModifier",
        ),
    ],
)
def test_fields_that_would_change_the_result_are_refused_with_the_reason(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_yaml(text)


def test_bookkeeping_values_without_effect_load():
    recipe = Recipe.from_yaml(
        _quant(
            "kv_cache_scheme: null, weight_observer: null, observer: null, "
            "bypass_divisibility_checks: false"
        )
        + "  t_modifiers:\n    SpinQuantModifier: {transform_block_size: null}\n"
    )
    quant, spin = recipe.modifiers
    assert quant.observer == "minmax" and spin.rotations == ["R1", "R2"]


def test_gptq_without_scheme_quantizes_with_the_earlier_modifiers_scheme(llama128, logs):
    recipe = Recipe.from_file(DATA / "quantization_then_gptq.yaml")
    assert any("run_type: 'oneshot' has no effect" in m for m in logs)
    (gptq,) = recipe.modifiers  # the two run as one GPTQModifier
    assert isinstance(gptq, GPTQModifier) and gptq.block_size == 128
    assert gptq.ignore == ["lm_head", "model.layers.0.mlp.down_proj"]
    reference = LlamaForCausalLM(llama128.config).eval()
    reference.load_state_dict(llama128.state_dict())
    model = oneshot(llama128, recipe, _data())
    assert not hasattr(model.model.layers[0].mlp.down_proj, "quantization_scheme")
    weights = model.model.layers[1].mlp.down_proj.quantization_scheme.weights
    assert (weights.num_bits, weights.symmetric, weights.group_size) == (4, False, 128)
    # exactly GPTQ with that scheme written on the GPTQModifier itself
    own = GPTQModifier(
        block_size=128, ignore=gptq.ignore, config_groups=gptq.config_groups, targets=["Linear"]
    )
    expected = oneshot(reference, [own], _data())
    for name, param in model.state_dict().items():
        assert torch.equal(param, expected.state_dict()[name]), name


def test_no_ignore_quantizes_a_tied_lm_head_after_untying_it(logs, tmp_path):
    torch.manual_seed(0)
    config = tiny_llama_config(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, tie_word_embeddings=True
    )
    model = LlamaForCausalLM(config).eval()
    embedding = model.model.embed_tokens.weight.detach().clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model = oneshot(model, Recipe.from_file(DATA / "no_ignore_w8a16.yaml"))
    assert model.lm_head.quantization_scheme.weights.num_bits == 8
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the embedding stays dense
    assert any("untied the input and output embeddings" in m for m in logs)
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        expected = model(ids).logits
    out = save_compressed(model, tmp_path / "ckpt")
    assert not json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
