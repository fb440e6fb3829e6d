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
        obs = modifier.state_dict()["observers"].get("model.layers.0.mlp.down_proj|input")
        observed.append(0 if obs is None else obs["batches"])

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


# ---------------------------------------------------------------- weight_blend_rate
W4_CHANNEL = {"g": {"weights": {"num_bits": 4, "strategy": "channel"}}}


def test_full_precision_share_follows_deepspeeds_updates():
    from compressor.modifiers.quantization.progressive import bit_drop_steps, full_precision_share

    # one update before the first quantized forward, then one per step, stopping at 0
    assert [full_precision_share(s, 0.25) for s in range(6)] == [0.75, 0.5, 0.25, 0, 0, 0]
    assert full_precision_share(1, 0.4) == pytest.approx(0.2)
    assert full_precision_share(2, 0.4) == 0.0  # 1 - 1.2 stops at 0
    # a bit drop puts the full-precision weight back, then it falls again
    drops = bit_drop_steps(start_bits=6, target_bits=4, period=2)
    assert drops == [1, 3]  # DeepSpeed's updates 2 and 4: the forwards of steps 1 and 3
    shares = [full_precision_share(s, 0.5, drops) for s in range(6)]
    assert shares == [0.5, 1.0, 0.5, 1.0, 0.5, 0.0]
    # period 1 drops at the very first update: that forward is all full precision
    assert full_precision_share(0, 0.5, bit_drop_steps(8, 6, 1)) == 1.0


def test_forward_weight_is_the_blend_and_the_checkpoint_is_quantized(
    tiny_llama, token_batches, tmp_path
):
    from transformers import AutoModelForCausalLM

    from compressor import save_compressed
    from compressor.modifiers.quantization.fake_quant import fake_quantize_weight

    q_proj = tiny_llama.model.layers[0].self_attn.q_proj
    original = q_proj.weight
    embed = tiny_llama.model.embed_tokens.weight
    args = QuantizationModifier(config_groups=W4_CHANNEL).resolve_quantization_config()
    args = args.config_groups["g"].weights
    errors, levels, grads = [], [], []

    def inspect(step):
        w = original.detach()
        quantized = fake_quantize_weight(w, args)
        share = [0.75, 0.5, 0.25, 0.0, 0.0][step]  # by hand: 1 - (step + 1) * 0.25, then 0
        expected = share * w + (1 - share) * quantized
        errors.append((q_proj.weight.detach() - expected).abs().max().item())
        levels.append(len(torch.unique(q_proj.weight.detach()[0])))
        grads.append((original.grad.abs().sum().item(), embed.grad.abs().sum().item()))

    modifier = QuantizationModifier(config_groups=W4_CHANNEL, start=0, weight_blend_rate=0.25)
    _train(tiny_llama, modifier, token_batches, steps=5, inspect=inspect)
    assert max(errors) < 1e-6
    assert all(n > 16 for n in levels[:3]) and all(n <= 16 for n in levels[3:])
    assert all(g > 0 and e > 0 for g, e in grads)  # straight-through gradient throughout
    # finalize: the compressed-tensors form holds 4-bit codes, and it saves and reloads
    assert q_proj.weight is original and hasattr(q_proj, "weight_scale")
    codes = torch.round(q_proj.weight / q_proj.weight_scale)
    assert all(len(torch.unique(codes[r])) <= 16 for r in range(codes.shape[0]))
    ids = token_batches[0]["input_ids"]
    tiny_llama.eval()
    with torch.no_grad():
        expected_logits = tiny_llama(ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(save_compressed(tiny_llama, tmp_path / "m"))
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(ids).logits, expected_logits, atol=1e-5)


def test_bit_drops_bring_the_full_precision_weight_back(tiny_llama, token_batches):
    q_proj = tiny_llama.model.layers[0].self_attn.q_proj
    original = q_proj.weight
    exact = []

    def inspect(step):
        exact.append(torch.equal(q_proj.weight.detach(), original.detach()))

    modifier = QuantizationModifier(
        config_groups=W4_CHANNEL,
        start=0,
        start_bits=6,
        target_bits=4,
        quantization_period=2,
        weight_blend_rate=0.5,
    )
    _train(tiny_llama, modifier, token_batches, steps=8, inspect=inspect)
    # shares 0.5, 1 (drop to 5 bits), 0.5, 1 (drop to 4 bits), 0.5, 0, 0, 0
    assert exact == [False, True, False, True, False, False, False, False]


def test_unfinished_blend_warns_and_still_saves_quantized_weights(tiny_llama, token_batches):
    from loguru import logger

    messages = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        modifier = QuantizationModifier(config_groups=W4_CHANNEL, start=0, weight_blend_rate=0.1)
        _train(tiny_llama, modifier, token_batches, steps=2)
    finally:
        logger.remove(sink)
    assert any("0.800 full-precision" in m for m in messages)
    q_proj = tiny_llama.model.layers[0].self_attn.q_proj
    codes = torch.round(q_proj.weight / q_proj.weight_scale)
    assert len(torch.unique(codes[0])) <= 16


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"scheme": "W4A16", "weight_blend_rate": 0.1}, "weight_blend_rate=0.1.*set start"),
        ({"scheme": "W4A16", "start": 0, "weight_blend_rate": 0}, "weight_blend_rate"),
        ({"scheme": "W4A16", "start": 0, "weight_blend_rate": 1.5}, "weight_blend_rate"),
        (
            {
                "config_groups": {"g": {"input_activations": {"num_bits": 8, "dynamic": True}}},
                "start": 0,
                "weight_blend_rate": 0.1,
            },
            "weight_blend_rate=0.1: no config group quantizes weights",
        ),
    ],
)
def test_weight_blend_rate_is_validated(args, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict({"modifiers": [{"QuantizationModifier": args}]})


def test_weight_blend_rate_round_trips_through_yaml():
    modifier = QuantizationModifier(config_groups=W4_CHANNEL, start=0, weight_blend_rate=0.01)
    recipe = Recipe.from_modifiers([modifier])
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.modifiers[0].weight_blend_rate == 0.01
