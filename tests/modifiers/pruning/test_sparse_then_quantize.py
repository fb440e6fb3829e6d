"""A sparse model quantizes afterwards without losing its zeros, saved dense with the sparsity
recorded in ``recipe.yaml`` and the ``README.md`` model card."""

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from compressor import Recipe, oneshot
from compressor.modifiers import QuantizationModifier, SparsePruningModifier

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
W8_CHANNEL = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
W4_GROUP = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 16}


def _linears(model):
    return {n: m for n, m in model.named_modules() if n.endswith(LINEARS)}


def _fake_quantized(module):
    scheme = module.quantization_scheme.weights
    zero_point = getattr(module, "weight_zero_point", None)
    return fake_quantize(module.weight, module.weight_scale, zero_point, scheme).detach()


def _smallest_half(weight, structure):
    """Where magnitude pruning to 50% (per layer, or 2 of every 4) puts its zeros."""
    magnitude = weight.abs()
    if structure == "2:4":
        groups = magnitude.reshape(-1, 4)
        smallest = groups.argsort(dim=1)[:, :2]
        return (
            torch.zeros_like(groups, dtype=torch.bool).scatter_(1, smallest, True).view_as(weight)
        )
    return magnitude <= magnitude.flatten().kthvalue(weight.numel() // 2).values


def _check_pattern(weight, structure, name):
    if structure == "2:4":
        assert ((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all(), name
    else:
        assert (weight == 0).float().mean().item() >= 0.5, name


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("weights", [W8_CHANNEL, W4_GROUP], ids=["w8-channel", "w4-group16"])
def test_pruned_zeros_survive_quantization_save_and_reload(
    tiny_llama, tmp_path, structure, weights
):
    pruner = (
        SparsePruningModifier(sparsity=0.5)
        if structure == "unstructured"
        else SparsePruningModifier(mask_structure="2:4")
    )
    quantizer = QuantizationModifier(
        config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"]
    )
    out = tmp_path / "sparse-quantized"
    pruned = {
        n: _smallest_half(m.weight.detach(), structure) for n, m in _linears(tiny_llama).items()
    }
    model = oneshot(tiny_llama, [pruner, quantizer], output_dir=out)

    quantized = {}
    for name, module in _linears(model).items():
        quantized[name] = _fake_quantized(module)
        assert (quantized[name][pruned[name]] == 0).all(), name  # every pruned zero stays zero
        assert (quantized[name][~pruned[name]] != 0).float().mean() > 0.9, name  # kept weights
        _check_pattern(quantized[name], structure, name)

    reloaded = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for name, module in _linears(reloaded).items():
        weight = module.weight.detach().to(quantized[name].dtype)
        assert torch.equal(weight, quantized[name]), name
        _check_pattern(weight, structure, name)

    saved = Recipe.from_file(out / "recipe.yaml").modifiers
    assert [type(m) for m in saved] == [SparsePruningModifier, QuantizationModifier]
    assert saved[0].mask_structure == structure
    assert saved[0].model_dump() == pruner.model_dump()  # sparsity, structure, targets
    card = (out / "README.md").read_text()
    assert "SparsePruningModifier" in card and "QuantizationModifier" in card
    # the card counts zeros of the effective weights: the pruned half, plus any weight that
    # quantization rounds to zero
    sparsity = card.split("## Sparsity")[1].split("##")[0].splitlines()
    fractions = dict(line[2:].split(": ") for line in sparsity if line.startswith("- "))
    zeros = sum(int((w == 0).sum()) for w in quantized.values())
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert float(fractions["overall"]) == pytest.approx(zeros / total, abs=1e-4)
    assert fractions["`lm_head`"] == "0.0000"
    for kind in LINEARS:
        assert 0.5 <= float(fractions[f"`{kind}`"]) < 0.6, kind
    described = f"weights int{weights['num_bits']} symmetric {weights['strategy']}"
    assert f"- {described}" in card and "on 14 module(s)" in card


def test_asymmetric_zero_points_keep_the_zeros_in_memory(tiny_llama):
    weights = {
        "num_bits": 8,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": 16,
    }
    quantizer = QuantizationModifier(
        config_groups={"g": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"]
    )
    pruned = {n: _smallest_half(m.weight.detach(), "2:4") for n, m in _linears(tiny_llama).items()}
    model = oneshot(tiny_llama, [SparsePruningModifier(mask_structure="2:4"), quantizer])
    for name, module in _linears(model).items():
        assert (module.weight_zero_point != 0).any(), name  # really asymmetric
        assert (_fake_quantized(module)[pruned[name]] == 0).all(), name
