"""Quantization-aware training schedules: activations starting after the weights, and the
blend from full-precision to quantized weights."""

from __future__ import annotations

import pytest
import torch

from compressor import Recipe, RecipeError, create_session
from compressor.modifiers import QuantizationModifier

W4_STATIC_A4 = {
    "g": {
        "weights": {"num_bits": 4, "strategy": "channel"},
        "input_activations": {"num_bits": 4, "dynamic": False},
    }
}


def _train(model, modifier, batches, steps, before=None, inspect=None, lr=0.01):
    """A session loop; ``before(step)`` runs after batch_start, ``inspect(step)`` after the
    forward and backward."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with create_session() as session:
        session.initialize(model, [modifier], optimizer=optimizer)
        for step in range(steps):
            batch = batches[step % len(batches)]
            session.batch_start(batch_data=batch)
            if before is not None:
                before(step)
            loss = session.loss_calculated(model(**batch, labels=batch["input_ids"]).loss)
            loss.backward()
            if inspect is not None:
                inspect(step)
            optimizer.step()
            optimizer.zero_grad()
            session.batch_end()
        session.finalize()


# ---------------------------------------------------------------- activation_start
def test_activations_pass_untouched_until_activation_start(tiny_llama, token_batches):
    down = tiny_llama.model.layers[0].mlp.down_proj
    raw, seen = {}, {}
    # registered before the modifier's hook, so it sees the input before quantization
    down.register_forward_pre_hook(lambda m, args: raw.__setitem__("x", args[0].detach()))
    down.register_forward_hook(lambda m, args, out: seen.__setitem__("x", args[0].detach()))
    modifier = QuantizationModifier(config_groups=W4_STATIC_A4, start=1, activation_start=3)
    untouched, levels, weight_levels, observed = [], [], [], []

    def inspect(step):
        untouched.append(torch.equal(raw["x"], seen["x"]))
        levels.append(len(torch.unique(seen["x"])))
        weight_levels.append(len(torch.unique(down.weight.detach()[0])))
        obs = modifier._observers.get(("model.layers.0.mlp.down_proj", "input"))
        observed.append(0 if obs is None else obs.batches)

    _train(tiny_llama, modifier, token_batches, steps=6, inspect=inspect)
    # weights from step 1, activations from step 3: the change is exactly at the step
    assert untouched == [True, True, True, False, False, False]
    assert all(n > 16 for n in levels[:3]) and all(n <= 16 for n in levels[3:])
    assert weight_levels[0] > 16 and all(n <= 16 for n in weight_levels[1:])
    assert observed == [0, 0, 0, 1, 2, 3]  # the static range is observed from step 3 on
    assert hasattr(down, "input_scale")  # finalize wrote the observed range


def test_activation_start_equal_to_start_quantizes_from_the_first_step(tiny_llama, token_batches):
    down = tiny_llama.model.layers[0].mlp.down_proj
    levels = []
    down.register_forward_hook(lambda m, args, out: levels.append(len(torch.unique(args[0]))))
    modifier = QuantizationModifier(config_groups=W4_STATIC_A4, start=0, activation_start=0)
    _train(tiny_llama, modifier, token_batches, steps=2)
    assert all(n <= 16 for n in levels)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"start": 4, "activation_start": 2}, "activation_start=2.*before start=4"),
        ({"start": 0, "end": 5, "activation_start": 5}, "activation_start=5.*before end=5"),
        ({"activation_start": 2}, "activation_start=2.*set start"),
    ],
)
def test_activation_start_is_validated(args, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict({"modifiers": [{"QuantizationModifier": {**args, "scheme": "W8A8"}}]})


def test_activation_start_needs_quantized_activations():
    with pytest.raises(RecipeError, match="activation_start.*no config group quantizes"):
        Recipe.from_dict(
            {
                "modifiers": [
                    {"QuantizationModifier": {"scheme": "W4A16", "start": 0, "activation_start": 2}}
                ]
            }
        )


def test_activation_start_round_trips_through_yaml():
    modifier = QuantizationModifier(config_groups=W4_STATIC_A4, start=0, activation_start=3)
    recipe = Recipe.from_modifiers([modifier])
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.modifiers[0].activation_start == 3
