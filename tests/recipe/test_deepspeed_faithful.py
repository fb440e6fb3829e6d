"""DeepSpeed configs that must compute what DeepSpeed computes: ternary and binary weights at
2 and 1 bits, and per-token dynamic activations. DeepSpeed's rules are written down here, from
its code (DeepSpeed 0.19.6, ``deepspeed/compression/utils.py``), as the reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from compressor import CompressionSession
from compressor.recipe import Recipe, RecipeError

DATA = Path(__file__).parent / "data"


def deepspeed_ternary(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """DeepSpeed's TernaryQuantizer: the flattened weight cut into ``groups`` rows; in each,
    entries whose magnitude exceeds 0.7 times the mean magnitude keep their sign, scaled by
    the mean magnitude of those entries; the others become 0."""
    rows = weight.reshape(groups, -1)
    threshold = 0.7 * rows.abs().sum(dim=1, keepdim=True) / rows.shape[1]
    kept = (rows.abs() > threshold).to(rows.dtype)
    alpha = (kept * rows).abs().sum(dim=1, keepdim=True) / kept.sum(dim=1, keepdim=True)
    return (alpha * (rows > threshold) - alpha * (rows < -threshold)).reshape(weight.shape)


def deepspeed_binary(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """DeepSpeed's BinaryQuantizer: per row of the cut weight, sign times mean magnitude."""
    rows = weight.reshape(groups, -1)
    return (rows.sign() * rows.abs().mean(dim=1, keepdim=True)).reshape(weight.shape)


def deepspeed_dynamic_symmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    """DeepSpeed's dynamic activation quantization (SymQuantizer with one group per token):
    scale ``2 * max|x| / 2**bits`` per token, rounded and clamped to [-2**(bits-1), 2**(bits-1)-1]."""
    rows = x.reshape(-1, x.shape[-1])
    levels = 2**bits
    scale = 2 * rows.abs().amax(dim=1, keepdim=True) / levels
    return ((rows / scale).round().clamp(-levels // 2, levels // 2 - 1) * scale).reshape(x.shape)


def _bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def _config(**shared) -> dict:
    config = json.loads((DATA / "ds_bert_xtc_low_bits.json").read_text())
    config["compression_training"]["weight_quantization"]["shared_parameters"].update(shared)
    return config


def _initialize_and_finalize(model, recipe) -> None:
    session = CompressionSession()
    session.initialize(model=model, recipe=recipe)  # schedule_offset 0: started here
    session.finalize()


@pytest.mark.parametrize("groups", [1, 32])
def test_two_bits_are_ternary_and_one_bit_binary_as_deepspeed_computes_them(groups):
    model = _bert()
    recipe = Recipe.from_deepspeed(_config(quantize_groups=groups))
    levels = {m.group: m.low_bit_weights for m in recipe.modifiers if m.low_bit_weights}
    assert levels == {
        "weight_quantization_binary_ffn": "binary",
        "weight_quantization_ternary_attention": "ternary",
    }
    layer = model.bert.encoder.layer[0]
    query, ffn = layer.attention.self.query, layer.intermediate.dense
    before = {"query": query.weight.detach().clone(), "ffn": ffn.weight.detach().clone()}
    _initialize_and_finalize(model, recipe)
    # groups=32: every layer here has 32 or 64 rows; 32 groups of whole rows are per-row for
    # the 32-row query, and pairs of rows for the 64-row FFN, where we are finer: checked on
    # the query only
    ternary = deepspeed_ternary(before["query"], groups)
    assert torch.allclose(query.weight, ternary, atol=1e-6)
    assert len(torch.unique(query.weight)) <= 2 * groups + 1
    if groups == 1:
        assert torch.allclose(ffn.weight, deepspeed_binary(before["ffn"], 1), atol=1e-6)
        assert len(torch.unique(ffn.weight)) == 2
    # int2 on the same weight is a different rule: the point of mapping to ternary
    int2 = (before["query"] / (before["query"].abs().max() / 1.5)).round().clamp(-2, 1)
    assert abs((int2 == 0).float().mean().item() - (ternary == 0).float().mean().item()) > 0.05


def test_dynamic_activations_are_per_token_as_in_deepspeed():
    model = _bert()
    recipe = Recipe.from_deepspeed(_config())
    attention = next(m for m in recipe.modifiers if "ternary" in m.group)
    inputs = attention.config_groups["ternary_attention"].input_activations
    assert (inputs.dynamic, inputs.strategy) == (True, "token")
    session = CompressionSession()
    session.initialize(model=model, recipe=recipe)
    key = model.bert.encoder.layer[0].attention.self.key
    seen = []  # registered after the quantizer's hook: sees the quantized input
    handle = key.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    # tokens of very different magnitudes: one range per token and one per tensor differ
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    x = x * torch.tensor([0.05, 0.3, 1.0, 3.0, 8.0]).view(1, 5, 1)
    with torch.no_grad():
        key(x)
    handle.remove()
    session.finalize()
    (quantized,) = seen
    per_token = deepspeed_dynamic_symmetric(x, 8)
    per_tensor = deepspeed_dynamic_symmetric(x.reshape(1, -1), 8).reshape(x.shape)
    # the same grouping as DeepSpeed; each token's step differs from DeepSpeed's by the
    # scale convention only (compressed-tensors divides the range by 127.5, DeepSpeed by 128)
    step = x.abs().amax(dim=-1, keepdim=True) / 127.5
    assert torch.all((quantized - per_token).abs() <= step * 1.01)
    assert ((quantized - per_tensor).abs() / step).max() > 10  # per tensor, small tokens vanish


@pytest.mark.parametrize(
    "shared, message",
    [
        ({"quantization_type": "asymmetric"}, "symmetric only"),
        ({"quantize_weight_in_forward": False, "rounding": "stochastic"}, "round to nearest"),
    ],
)
def test_low_bit_settings_deepspeed_refuses_are_refused(shared, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_deepspeed(_config(**shared))


def test_sparse_pruning_of_a_container_key_prunes_its_linear_layers_as_deepspeed():
    config = {
        "sparse_pruning": {
            "shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 0},
            "different_groups": {
                "sp1": {"params": {"dense_ratio": 0.5}, "modules": ["attention.self"]}
            },
        }
    }
    recipe = Recipe.from_deepspeed(config)
    (sparse,) = recipe.modifiers
    assert sparse.layers_only and sparse.targets == ["re:.*attention.self"]
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    model = _bert()
    _initialize_and_finalize(model, recipe)
    for layer in model.bert.encoder.layer:
        attention = layer.attention.self
        for linear in (attention.query, attention.key, attention.value):
            assert (linear.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
        assert (layer.attention.output.dense.weight == 0).float().mean().item() < 0.01


def test_snip_momentum_keys_with_another_method_are_ignored_as_deepspeed_ignores_them():
    # DeepSpeed reads block_pattern, schedule_offset_stride and excluded_modules only with
    # method snip_momentum (tests/recipe/test_deepspeed_snip_momentum.py); with l1 it does
    # not, so they are accepted (and logged), never misread
    shared = {
        "enabled": True,
        "method": "l1",
        "block_pattern": "4x1",
        "dense_ratio": 0.4,
        "schedule_offset": 0,
        "schedule_offset_stride": 2,
        "excluded_modules": ["classifier"],
    }
    groups = {"sp1": {"params": {"dense_ratio": 0.5}, "modules": ["query"]}}
    recipe = Recipe.from_deepspeed(
        {"sparse_pruning": {"shared_parameters": shared, "different_groups": groups}}
    )
    (modifier,) = recipe.modifiers
    assert modifier.density == 0.5 and modifier.method == "l1"
    assert modifier.block_pattern is None and modifier.ignore == []
