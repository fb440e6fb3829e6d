"""Wanda: masks equal a hand computation per output row; the modifier on tiny Llamas."""

import pytest
import torch
from datasets import Dataset
from pydantic import ValidationError

from compressor import Recipe, oneshot
from compressor.modifiers import WandaPruningModifier
from compressor.modifiers.pruning.wanda import accumulate_square_sums, wanda_mask

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_wanda_mask_equals_a_hand_computation_per_row():
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]])
    x = torch.tensor([[1.0, 0.0, 0.0, 2.0], [1.0, 1.0, 0.0, 2.0], [-1.0, 0.0, 1.0, 0.0]])
    sums = accumulate_square_sums(x[:2].unsqueeze(0), None)
    sums = accumulate_square_sums(x[2:], sums)
    # column norms: sqrt(3), 1, 1, sqrt(8); scores |W| * norm:
    # row 0: 1.73, 2, 3, 1.41 -> prune columns 3 and 0
    # row 1: 6.93, 1, 1, 5.66 -> prune columns 1 and 2 (a per-layer ranking would differ)
    expected = torch.tensor([[True, False, False, True], [False, True, True, False]])
    assert torch.equal(wanda_mask(weight, sums, 0.5), expected)
    # 1:4 (keep 1 of 4): each row keeps its highest score
    keep_one = torch.tensor([[True, True, False, True], [False, True, True, True]])
    assert torch.equal(wanda_mask(weight, sums, 0.0, (1, 4)), keep_one)


def test_wanda_mask_equals_the_per_row_ranking_on_random_weights():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=gen)
    x = torch.randn(100, 32, generator=gen) * torch.rand(32, generator=gen)
    mask = wanda_mask(weight, accumulate_square_sums(x, None), 0.25)
    scores = weight.abs() * x.norm(dim=0)
    for row, row_mask in zip(scores, mask, strict=True):
        assert set(row.argsort()[:8].tolist()) == set(row_mask.nonzero().flatten().tolist())
    nm = wanda_mask(weight, accumulate_square_sums(x, None), 0.5, (2, 4))
    assert (nm.reshape(-1, 4).sum(dim=1) == 2).all()
    for group, group_mask in zip(scores.reshape(-1, 4), nm.reshape(-1, 4), strict=True):
        assert set(group.argsort()[:2].tolist()) == set(group_mask.nonzero().flatten().tolist())


def random_data(count=8, length=32):
    gen = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"input_ids": torch.randint(0, 128, (count, length), generator=gen)})


def _linears(model):
    return {n: m for n, m in model.named_modules() if n.endswith(LINEARS)}


@pytest.mark.parametrize("structure", ["0:0", "2:4"])
def test_llmcompressor_wanda_recipe_prunes_every_row_alike(tiny_llama, structure):
    recipe = Recipe.from_yaml(
        f"""
sparsity_stage:
  sparsity_modifiers:
    WandaPruningModifier:
      sparsity: 0.5
      mask_structure: "{structure}"
      ignore: ["re:.*lm_head"]
"""
    )
    before = {n: m.weight.detach().clone() for n, m in _linears(tiny_llama).items()}
    model = oneshot(tiny_llama, recipe, random_data())
    for name, module in _linears(model).items():
        weight = module.weight.detach()
        assert ((weight == 0).sum(dim=1) == weight.shape[1] // 2).all(), name  # every row
        kept = weight != 0
        assert torch.equal(weight[kept], before[name][kept]), name  # no compensation
        if structure == "2:4":
            assert ((weight.reshape(-1, 4) != 0).sum(dim=1) == 2).all(), name
    assert (model.lm_head.weight != 0).all()


def test_bad_wanda_recipes_are_refused(tiny_llama):
    with pytest.raises(ValidationError, match=r"sparsity must be in \[0, 1\)"):
        WandaPruningModifier(sparsity=1.5)
    with pytest.raises(ValueError, match="3 values but targets"):
        oneshot(
            tiny_llama,
            [WandaPruningModifier(sparsity=[0.5] * 3, targets=["re:model.layers.\\d+$"])],
            random_data(),
        )
    with pytest.raises(ValueError, match="Embedding; only Linear"):
        oneshot(
            tiny_llama, [WandaPruningModifier(sparsity=0.5, targets=["Embedding"])], random_data()
        )


def test_wanda_mask_structure_prunes_n_of_m(tiny_llama):
    """As llm-compressor's Wanda: "3:4" prunes three of every four weights per row."""
    recipe = [WandaPruningModifier(mask_structure="3:4", ignore=["re:.*lm_head"])]
    model = oneshot(tiny_llama, recipe, random_data())
    for name, module in _linears(model).items():
        assert ((module.weight.detach().reshape(-1, 4) != 0).sum(dim=1) == 1).all(), name
