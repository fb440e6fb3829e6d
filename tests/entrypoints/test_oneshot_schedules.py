"""One rule for a training schedule in a post-training run: oneshot refuses every modifier
with ``start``, ``end`` or ``update`` set, before any work, naming the modifier and field."""

import os

import pytest
import torch

from compressor import CompressionSession, Recipe, RecipeError, oneshot
from compressor.entrypoints.cli import main

SCHEDULED = [
    ("SparsePruningModifier", {"density": 0.5, "start": 5}, "start"),
    ("RowPruningModifier", {"density": 0.5, "start": 0, "end": 4}, "start"),
    ("HeadPruningModifier", {"density": 0.5, "start": 1, "end": 3}, "start"),
    ("QuantizationModifier", {"scheme": "W4A16", "start": 0}, "start"),
    ("QuantizationModifier", {"scheme": "W4A16", "update": 2}, "update"),
    ("LayerReductionModifier", {"drop_layers": [1], "start": 0}, "start"),
    ("SpinQuantModifier", {"start": 0}, "start"),
    ("OutputDistillationModifier", {"start": 0}, "start"),
    ("ConstantPruningModifier", {"start": 0}, "start"),
    (
        "MagnitudePruningModifier",
        {"init_sparsity": 0.05, "final_sparsity": 0.5, "start": 0, "end": 4},
        "start",
    ),
]


def _recipe(name, args):
    return Recipe.from_dict({"prune_stage": {"main_modifiers": {name: args}}})


@pytest.mark.parametrize("name, args, field", SCHEDULED, ids=[f"{n}-{f}" for n, _, f in SCHEDULED])
def test_every_scheduled_modifier_is_refused_before_the_model_is_loaded(
    tmp_path, name, args, field
):
    missing_model = tmp_path / "no-such-model"
    with pytest.raises(RecipeError) as err:
        oneshot(missing_model, _recipe(name, args), output_dir=tmp_path / "out")
    message = str(err.value)
    assert message.startswith(f"prune_stage -> main_modifiers -> {name} -> {field}: ")
    assert f"{name} has a training schedule" in message
    assert "Remove" in message and "CompressionTrainer" in message
    assert os.listdir(tmp_path) == []


def test_the_model_is_left_untouched_and_nothing_is_saved(tiny_llama, tmp_path):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    recipe = Recipe.from_yaml(
        """
quant_stage:
  quant_modifiers:
    SpinQuantModifier: {}
    QuantizationModifier:
      start: 0
      config_groups: {g: {targets: [Linear], weights: {num_bits: 8, strategy: channel}}}
"""
    )
    with pytest.raises(RecipeError, match="quant_modifiers -> QuantizationModifier -> start"):
        oneshot(tiny_llama, recipe, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for key, value in tiny_llama.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not any(m.initialized for m in recipe.modifiers)


def test_the_same_recipe_without_start_compresses_and_with_start_trains(tiny_llama):
    # the refusal is about the run, not the recipe: a training loop takes the schedule
    recipe = _recipe("SparsePruningModifier", {"density": 0.5, "start": 0})
    optimizer = torch.optim.SGD(tiny_llama.parameters(), lr=0.0)
    session = CompressionSession()
    session.initialize(model=tiny_llama, recipe=recipe, optimizer=optimizer)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    session.batch_start(batch_data={"input_ids": ids})
    tiny_llama(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    session.batch_end()
    session.finalize()
    weight = tiny_llama.model.layers[0].mlp.down_proj.weight
    assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_the_cli_prints_the_refusal_in_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "p_stage:\n  p_modifiers:\n    SparsePruningModifier: {density: 0.5, start: 3}\n"
    )
    code = main(
        [
            "oneshot",
            "--model",
            str(tmp_path / "m"),
            "--recipe",
            str(recipe),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code != 0
    err = capsys.readouterr().err
    assert "SparsePruningModifier -> start" in err and "training schedule" in err
