"""Recipes written for llm-compressor load and run here with the same meaning."""

from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from transformers import LlamaForCausalLM

from compressor import CompressionSession, Recipe, RecipeError, oneshot
from compressor.modifiers import (
    ConstantPruningModifier,
    GPTQModifier,
    MagnitudePruningModifier,
    QuantizationModifier,
    SpinQuantModifier,
)
from conftest import tiny_llama_config

DATA = Path(__file__).parent / "data" / "llmcompressor"


@pytest.fixture
def llama128():
    """A tiny Llama whose Linear input widths are multiples of 128 (W4A16 groups of 128)."""
    torch.manual_seed(0)
    config = tiny_llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    return LlamaForCausalLM(config).eval()


def _ids(n=4, length=16):
    return [
        torch.randint(0, 128, (length,), generator=torch.Generator().manual_seed(i))
        for i in range(n)
    ]


def _data(n=4, length=16):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [t.tolist() for t in _ids(n, length)]})


def test_w4a16_scheme_recipe_quantizes_linears_but_not_lm_head(llama128):
    recipe = Recipe.from_file(DATA / "w4a16.yaml")
    (modifier,) = recipe.modifiers
    assert isinstance(modifier, QuantizationModifier) and modifier.targets == ["Linear"]
    model = oneshot(llama128, recipe)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.quantization_scheme.weights.num_bits == 4
    assert q_proj.quantization_scheme.weights.group_size == 128
    assert getattr(model.lm_head, "quantization_scheme", None) is None
    # the forward uses at most 16 distinct values in each group of 128 weights
    effective = fake_quantize(
        q_proj.weight,
        q_proj.weight_scale,
        q_proj.weight_zero_point,
        q_proj.quantization_scheme.weights,
    )
    assert max(len(torch.unique(group)) for group in effective.detach().reshape(-1, 128)) <= 16


def test_config_groups_recipe_gives_dynamic_per_token_activations(llama128):
    recipe = Recipe.from_file(DATA / "w8a8_config_groups.yaml")
    model = oneshot(llama128, recipe, _data(), pipeline="basic")
    scheme = model.model.layers[1].mlp.down_proj.quantization_scheme
    assert scheme.weights.num_bits == 8 and scheme.weights.strategy == "channel"
    assert scheme.input_activations.dynamic is True
    assert scheme.input_activations.strategy == "token"


def test_spinquant_then_quantization_recipe(llama128):
    recipe = Recipe.from_file(DATA / "spinquant_w4a16.yaml")
    spin, quant = recipe.modifiers
    assert isinstance(spin, SpinQuantModifier) and spin.rotations == ["R1", "R2"]
    assert isinstance(quant, QuantizationModifier)
    model = oneshot(llama128, recipe)
    assert model.model.layers[0].mlp.up_proj.quantization_scheme.weights.num_bits == 4


def test_gptq_recipe_runs_layer_by_layer(llama128):
    recipe = Recipe.from_file(DATA / "gptq_w4a16.yaml")
    (modifier,) = recipe.modifiers
    assert isinstance(modifier, GPTQModifier)
    assert (modifier.block_size, modifier.dampening_frac, modifier.actorder) == (
        128,
        0.01,
        "static",
    )
    model = oneshot(llama128, recipe, _data())
    down = model.model.layers[1].mlp.down_proj
    effective = fake_quantize(
        down.weight, down.weight_scale, down.weight_zero_point, down.quantization_scheme.weights
    )
    assert max(len(torch.unique(group)) for group in effective.detach().reshape(-1, 128)) <= 16


def _train(model, recipe, steps=6):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    session = CompressionSession()
    session.initialize(model=model, recipe=recipe, optimizer=opt)
    for ids in _ids(steps):
        batch = {"input_ids": ids.unsqueeze(0)}
        session.batch_start(batch_data=batch)
        loss = session.loss_calculated(model(**batch, labels=batch["input_ids"]).loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        session.batch_end()
    session.finalize()
    return model


def test_gradual_magnitude_pruning_recipe_reaches_its_final_sparsity(tiny_llama):
    recipe = Recipe.from_file(DATA / "gradual_magnitude.yaml")
    (modifier,) = recipe.modifiers
    assert isinstance(modifier, MagnitudePruningModifier)
    assert (modifier.init_density, modifier.density, modifier.ramp) == (0.95, 0.5, "cubic")
    model = _train(tiny_llama.train(), recipe)
    for layer in model.model.layers:
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert (proj.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
        assert (layer.self_attn.q_proj.weight == 0).float().mean().item() < 0.01
    # written back in our field names, and it re-reads to the same modifier
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def test_constant_pruning_recipe_keeps_existing_zeros_through_training(tiny_llama):
    model = tiny_llama.train()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_((torch.rand_like(param) > 0.3).float())
    layers = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    before = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if any(f"{layer}.weight" in n for layer in layers)
    }
    recipe = Recipe.from_file(DATA / "constant.yaml")
    assert isinstance(recipe.modifiers[0], ConstantPruningModifier)
    _train(model, recipe)
    params = dict(model.named_parameters())
    for name, weight in before.items():
        zeros = weight == 0
        assert zeros.float().mean() > 0.2
        assert torch.all(params[name][zeros] == 0), name
        # the other weights did train
        assert not torch.equal(params[name][~zeros], weight[~zeros]), name


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "s_stage:\n  q_modifiers:\n    QuantizationModifier: "
            "{scheme: W4A16, kv_cache_scheme: {num_bits: 8, dynamic: true}}\n",
            "QuantizationModifier.*kv_cache_scheme: dynamic=True is not supported",
        ),
        (
            "s_stage:\n  q_modifiers:\n    GPTQModifier: {scheme: W4A16, offload_hessians: true}\n",
            "GPTQModifier -> offload_hessians: unknown field",
        ),
        (
            "s_stage:\n  p_modifiers:\n    MagnitudePruningModifier: {final_sparsity: 0.5, apply_globally: true}\n",
            "apply_globally=True is not supported",
        ),
        (
            "s_stage:\n  p_modifiers:\n    MagnitudePruningModifier: {final_sparsity: 0.5, leave_enabled: true}\n",
            "leave_enabled=True is not supported",
        ),
        (
            "s_stage:\n  p_modifiers:\n    MagnitudePruningModifier: {final_sparsity: 0.5, update_scheduler: exponential}\n",
            "MagnitudePruningModifier -> ramp",
        ),
    ],
)
def test_unsupported_llmcompressor_fields_are_named(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_yaml(text)


def test_constant_pruning_without_a_match_is_an_error(tiny_llama):
    session = CompressionSession()
    with pytest.raises(ValueError, match="matches no Linear"):
        session.initialize(
            model=tiny_llama, recipe=[ConstantPruningModifier(targets=["re:nothing.*"])]
        )


def _bf16(model, tmp_path):
    """FP4 / MX need a bfloat16 model: the model as a user loads it in bfloat16."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "dense")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16).eval()


@pytest.mark.parametrize(("name", "fmt"), [("nvfp4", "nvfp4"), ("mxfp4_a16", "mxfp4")])
def test_fp4_recipes_run_and_save_packed(llama128, tmp_path, name, fmt):
    import json

    recipe = Recipe.from_file(DATA / f"{name}.yaml")
    model = oneshot(_bf16(llama128, tmp_path), recipe, _data(), output_dir=tmp_path / "out")
    down = model.model.layers[0].mlp.down_proj
    assert down.quantization_scheme.weights.num_bits == 4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["format"] == f"{fmt}-pack-quantized"


def test_fp8_kv_cache_recipe_calibrates_the_cache_and_saves_its_scales(llama128, tmp_path):
    import json

    from safetensors.torch import load_file

    recipe = Recipe.from_file(DATA / "fp8_kv_cache.yaml")
    (modifier,) = recipe.modifiers
    assert modifier.kv_cache_scheme is not None and modifier.kv_cache_scheme.type == "float"
    model = oneshot(llama128, recipe, _data(), output_dir=tmp_path / "out")
    attention = model.model.layers[1].self_attn
    assert attention.k_scale.item() > 0 and attention.v_scale.item() > 0
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(tensors["model.layers.1.self_attn.k_scale"], attention.k_scale.data)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"]["num_bits"] == 8
    # the recipe written beside the checkpoint round-trips the field
    again = Recipe.from_file(tmp_path / "out" / "recipe.yaml")
    assert again.modifiers[0].kv_cache_scheme == modifier.kv_cache_scheme


def test_static_observer_recipe_keeps_its_observers_meaning_and_reloads(llama128, tmp_path):
    """The recipe's two observers as llm-compressor runs them: q_proj's range the extremes of
    its inputs over the batches, down_proj's a moving average (constant 0.1) that starts at
    the first batch; the checkpoint reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    reference = LlamaForCausalLM(llama128.config).eval()
    reference.load_state_dict(llama128.state_dict())
    data = _data(n=6)
    recipe = Recipe.from_file(DATA / "w8a8_static_observers.yaml")
    model = oneshot(llama128, recipe, data, output_dir=tmp_path / "out")
    q_proj = model.model.layers[0].self_attn.q_proj
    q_args = q_proj.quantization_scheme.input_activations
    assert (q_args.observer, q_args.symmetric) == ("static_minmax", False)
    # layer 0's q_proj sees the input norm of the embeddings, unchanged by any quantization
    seen: list[torch.Tensor] = []
    ref_q = reference.model.layers[0].self_attn.q_proj
    handle = ref_q.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for ids in data["input_ids"]:
            reference(input_ids=torch.tensor(ids).unsqueeze(0))
    handle.remove()
    lo = torch.stack([s.min() for s in seen]).min().clamp(max=0)
    hi = torch.stack([s.max() for s in seen]).max().clamp(min=0)
    torch.testing.assert_close(q_proj.input_scale.reshape(()), (hi - lo) / 255, rtol=1e-4, atol=0)
    down = model.model.layers[0].mlp.down_proj.quantization_scheme.input_activations
    assert down.observer == "minmax" and down.observer_kwargs == {"averaging_constant": 0.1}
    ids = torch.tensor(data["input_ids"][0]).unsqueeze(0)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
