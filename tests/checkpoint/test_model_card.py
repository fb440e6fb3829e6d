import torch
from compressed_tensors.quantization import QuantizationScheme

from compressor import Recipe
from compressor.checkpoint.model_card import linear_sparsity, model_card
from compressor.modifiers import QuantizationModifier, SparsePruningModifier


def test_sparsity_counts_exact_zeros_per_module_type(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.up_proj.weight[:16] = 0  # a quarter of one of two layers
        tiny_llama.model.layers[1].self_attn.q_proj.weight.zero_()
    overall, per_kind = linear_sparsity(tiny_llama)
    assert per_kind["up_proj"] == 0.125 and per_kind["q_proj"] == 0.5
    assert per_kind["down_proj"] == 0.0 and "lm_head" in per_kind
    linears = [m for m in tiny_llama.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(m.weight.numel() for m in linears)
    assert overall == (16 * 32 + 32 * 32) / total


def test_card_lists_modifiers_sparsity_and_the_scheme(tiny_llama):
    recipe = Recipe.from_modifiers(
        [SparsePruningModifier(mask_structure="2:4"), QuantizationModifier(scheme="W8A16")]
    )
    card = model_card(tiny_llama, recipe)
    lines = card.splitlines()
    assert lines.count('- `SparsePruningModifier`: `{"mask_structure": "2:4"}`') == 1
    assert sum(line.startswith("- `QuantizationModifier`") for line in lines) == 1
    assert "- overall: 0.0000" in lines and "## Quantization" not in card

    layer = tiny_llama.model.layers[0].mlp.down_proj
    layer.quantization_scheme = QuantizationScheme(
        targets=["Linear"], weights={"num_bits": 4, "symmetric": True, "strategy": "channel"}
    )
    card = model_card(tiny_llama, recipe)
    assert "## Quantization" in card
    assert "- weights int4 symmetric channel on 1 module(s)" in card.splitlines()
