"""ExpertPruningModifier: whole experts removed by REAP saliency, the model reloads with
fewer experts and stays closer to the original than removing experts at random."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from compressor import oneshot
from compressor.architectures.moe import find_moe_blocks
from compressor.modifiers import ExpertPruningModifier
from compressor.modifiers.pruning.experts import experts_to_keep, remove_experts
from compressor.recipe import Recipe, RecipeError
from moe_models import tiny_moe

NUM_EXPERTS_KEY = {"qwen3_moe": "num_experts", "mixtral": "num_local_experts"}


def calibration(rows=8, length=32):
    gen = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"input_ids": torch.randint(0, 128, (rows, length), generator=gen)})


def held_out():
    return torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(7))


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    p = reference.log_softmax(-1)
    q = other.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_experts_to_keep_drops_the_least_scores_in_order():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])
    assert experts_to_keep(scores, 2).tolist() == [0, 2, 4]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_reap_prunes_two_experts_reloads_and_beats_random(family, tmp_path):
    original = tiny_moe(family)
    ids = held_out()
    with torch.no_grad():
        reference = original(ids).logits
    before = sum(p.numel() for p in original.parameters())
    block = find_moe_blocks(original)[0]
    experts = original.get_submodule(block.experts)
    per_expert = sum(p[0].numel() for p in experts.parameters(recurse=False))
    router_row = original.get_submodule(block.router).weight[0].numel()

    model = oneshot(
        tiny_moe(family),
        [ExpertPruningModifier(num_experts_to_prune=2)],
        dataset=calibration(),
        output_dir=tmp_path / "out",
        num_calibration_samples=8,
    )
    layers = len(find_moe_blocks(model))
    after = sum(p.numel() for p in model.parameters())
    assert before - after == layers * 2 * (per_expert + router_row)
    assert getattr(model.config, NUM_EXPERTS_KEY[family]) == 6
    assert all(b.num_experts == 6 for b in find_moe_blocks(model))

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert getattr(reloaded.config, NUM_EXPERTS_KEY[family]) == 6
    with torch.no_grad():
        pruned = model(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, pruned, atol=1e-4, rtol=0)
        generated = reloaded.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 14)

    random_kl = []
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        candidate = tiny_moe(family)
        for b in find_moe_blocks(candidate):
            keep = torch.randperm(8, generator=gen)[:6].sort().values
            remove_experts(
                candidate.get_submodule(b.experts), candidate.get_submodule(b.router), keep, 8
            )
        with torch.no_grad():
            random_kl.append(kl(reference, candidate(ids).logits))
    reap_kl = kl(reference, pruned)
    assert reap_kl < sum(random_kl) / len(random_kl), (reap_kl, random_kl)


def test_pruning_below_top_k_is_refused_before_any_work():
    model = tiny_moe("qwen3_moe")
    with pytest.raises(
        ValueError, match=r"num_experts_to_prune=7.*8 experts routed top-2.*at most 6"
    ):
        oneshot(model, [ExpertPruningModifier(num_experts_to_prune=7)], dataset=calibration())
    assert model.config.num_experts == 8


def test_the_documented_recipe_parses_and_a_bad_count_is_refused():
    text = """
prune_stage:
  pruning_modifiers:
    ExpertPruningModifier:
      num_experts_to_prune: 2
"""
    (modifier,) = Recipe.from_yaml(text).modifiers
    assert isinstance(modifier, ExpertPruningModifier)
    assert modifier.num_experts_to_prune == 2
    assert modifier.requires_calibration_data()
    with pytest.raises(
        RecipeError, match=r"num_experts_to_prune: got 0; .*greater than or equal to 1"
    ):
        Recipe.from_yaml(text.replace(": 2", ": 0"))


@pytest.mark.parametrize(
    ("family", "bias"), [("gpt_oss", "bias"), ("deepseek_v3", "e_score_correction_bias")]
)
def test_router_biases_shrink_with_the_experts_and_reload(family, bias, tmp_path):
    model = tiny_moe(family)
    rows = {}
    for block in find_moe_blocks(model):
        router = model.get_submodule(block.router)
        with torch.no_grad():  # distinct, small values that identify each expert
            getattr(router, bias).copy_(torch.arange(8, dtype=torch.float32) * 1e-3)
        rows[block.name] = router.weight.detach().clone()
    model = oneshot(
        model,
        [ExpertPruningModifier(num_experts_to_prune=2)],
        dataset=calibration(),
        output_dir=tmp_path / "out",
        num_calibration_samples=8,
        pipeline="basic",
    )
    for block in find_moe_blocks(model):
        router = model.get_submodule(block.router)
        kept = (getattr(router, bias) / 1e-3).round().long()
        assert kept.numel() == 6 and torch.equal(kept, kept.sort().values)
        assert torch.equal(router.weight, rows[block.name][kept])
        experts = model.get_submodule(block.experts)
        assert all(p.shape[0] == 6 for p in experts.parameters(recurse=False))
    ids = held_out()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
