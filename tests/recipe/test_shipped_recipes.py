"""Every recipe shipped in ``recipes/`` parses and compresses a small Llama as it says."""

from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from datasets import Dataset
from transformers import LlamaForCausalLM

from compressor import Recipe, oneshot

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_the_recipes_folder_is_found():
    assert RECIPES, "no recipe found in recipes/"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_a_shipped_recipe_quantizes_every_linear_but_lm_head_to_4_bit_groups(path):
    from conftest import tiny_llama_config

    recipe = Recipe.from_yaml(path.read_text())
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    torch.manual_seed(0)
    # widths that groups of 64 divide, as SmolLM2's do (576 and 1536)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128)).eval()
    head = model.lm_head.weight.clone()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    oneshot(model, recipe, Dataset.from_dict({"input_ids": ids}), batch_size=2)
    linears = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    ]
    assert len(linears) == 14
    for name, module in linears:
        args = module.quantization_scheme.weights
        assert (args.num_bits, args.group_size) == (4, 64), name
        assert module.weight_scale.shape == (module.weight.shape[0], module.weight.shape[1] // 64)
        # what the forward computes with: the weight on the module's own grid
        zero = getattr(module, "weight_zero_point", None)
        effective = fake_quantize(module.weight, module.weight_scale, zero, args).detach()
        groups = effective.reshape(module.weight.shape[0], -1, 64)
        levels = max(len(torch.unique(g)) for row in groups for g in row)
        assert levels <= 16, f"{path.name}: {name} has {levels} levels in a group of 64"
    assert torch.equal(model.lm_head.weight, head)
