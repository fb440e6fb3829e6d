"""Quantization-aware training: fake quantization with straight-through gradients."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationStatus
from torch.nn.utils import parametrize

from compressor import create_session
from compressor.modifiers import QuantizationModifier

W4_STATIC_A8 = {
    "g": {
        "weights": {"num_bits": 4, "group_size": 16},
        "input_activations": {"num_bits": 8, "dynamic": False},
    }
}


def _train(model, modifier, batches, steps, lr=0.01, inspect=None):
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    with create_session() as session:
        session.initialize(model, [modifier], optimizer=optimizer)
        for step in range(steps):
            batch = batches[step % len(batches)]
            session.batch_start(batch_data=batch)
            loss = session.loss_calculated(model(**batch, labels=batch["input_ids"]).loss)
            loss.backward()
            if inspect is not None:
                inspect(step, model)
            optimizer.step()
            optimizer.zero_grad()
            session.batch_end()
            losses.append(loss.item())
        session.finalize()
    return losses


def test_loss_falls_and_gradients_reach_full_precision_weights(tiny_llama, token_batches):
    q_proj = tiny_llama.model.layers[0].self_attn.q_proj
    original = q_proj.weight  # the Parameter object the optimizer holds
    embed = tiny_llama.model.embed_tokens.weight
    seen = {}

    def inspect(step, model):
        if step == 0:
            assert parametrize.is_parametrized(q_proj, "weight")
            assert q_proj.parametrizations.weight.original is original
            seen["weight_grad"] = original.grad.abs().sum().item()
            # the embedding sits before every quantized input: it only learns when the
            # activation quantization passes gradients through
            seen["embed_grad"] = embed.grad.abs().sum().item()
            seen["distinct"] = len(torch.unique(q_proj.weight.detach()[0, :16]))

    modifier = QuantizationModifier(config_groups=W4_STATIC_A8, start=0)
    losses = _train(tiny_llama, modifier, token_batches[:1], steps=30, inspect=inspect)
    assert seen["weight_grad"] > 0 and seen["embed_grad"] > 0
    assert seen["distinct"] <= 16  # the forward saw 4-bit weights
    assert losses[-1] < 0.8 * losses[0]
    # finalize: fake quantization removed, the same Parameter back, compressed-tensors frozen
    assert not parametrize.is_parametrized(q_proj)
    assert q_proj.weight is original
    assert q_proj.quantization_status == QuantizationStatus.FROZEN
    assert modifier.num_hooks == 0


def test_trained_model_matches_its_frozen_compressed_tensors_form(tiny_llama, token_batches):
    modifier = QuantizationModifier(config_groups=W4_STATIC_A8, start=0, end=3)
    scales = []

    def inspect(step, model):
        observed = modifier.state_dict()["observers"]["model.layers.0.mlp.down_proj|input"]
        lo, hi = observed["lo"], observed["hi"]
        scales.append(torch.maximum(lo.abs(), hi.abs()).clone())

    _train(tiny_llama, modifier, token_batches, steps=6, inspect=inspect)
    # ranges move until end (step 3), then stay frozen
    assert not torch.equal(scales[0], scales[2])
    assert torch.equal(scales[3], scales[5])
    down = tiny_llama.model.layers[0].mlp.down_proj
    assert torch.allclose(down.input_scale * 127.5, scales[-1].reshape(1), rtol=1e-5)
    assert down.quantization_status == QuantizationStatus.FROZEN


def test_dynamic_activations_pass_gradients(tiny_llama, token_batches):
    grads = {}

    def inspect(step, model):
        grads[step] = model.model.embed_tokens.weight.grad.abs().sum().item()

    losses = _train(
        tiny_llama,
        QuantizationModifier(scheme="W8A8", start=0),
        token_batches[:1],
        10,
        inspect=inspect,
    )
    assert grads[0] > 0 and losses[-1] < losses[0]


def test_stochastic_rounding_is_unbiased_and_random(tiny_llama, token_batches):
    values = []
    errors = {}
    q_proj = tiny_llama.model.layers[0].self_attn.q_proj

    def inspect(step, model):
        values.append(q_proj.weight.detach().clone())
        if step == 0:  # unbiased: the mean of many roundings comes back to the weight
            original = q_proj.parametrizations.weight.original.detach()
            with torch.no_grad():
                mean = torch.stack([q_proj.weight for _ in range(400)]).mean(0)
            peaks = original.unflatten(1, (-1, 16)).abs().amax(dim=2, keepdim=True)
            nearest = (original.unflatten(1, (-1, 16)) / (peaks / 7.5)).round() * (peaks / 7.5)
            errors["mean"] = (mean - original).abs().mean().item()
            errors["nearest"] = (nearest.flatten(1) - original).abs().mean().item()

    modifier = QuantizationModifier(
        config_groups={"g": {"weights": {"num_bits": 4, "group_size": 16}}},
        start=0,
        rounding="stochastic",
    )
    _train(tiny_llama, modifier, token_batches, steps=2, lr=0.0, inspect=inspect)
    assert not torch.equal(values[0], values[1])  # same weights, different roundings
    # nearest rounding is off by a quarter step on average; 400 stochastic roundings average
    # to within a few hundredths of a step (the largest weight of a group, on the grid's
    # edge, is clamped)
    assert errors["mean"] < 0.3 * errors["nearest"]


def test_progressive_bits_drop_on_the_doubling_schedule(tiny_llama, token_batches):
    q_proj = tiny_llama.model.layers[0].self_attn.q_proj
    bits = []

    def inspect(step, model):
        original = q_proj.parametrizations.weight.original.detach()
        quantized = q_proj.weight.detach()
        peak = original.abs().amax(dim=1, keepdim=True)
        for b in range(2, 9):  # the grid the forward used: integer codes of max|w| / (2^b-1)/2
            codes = quantized / (peak / ((2**b - 1) / 2))
            if torch.allclose(codes, codes.round(), atol=1e-3):
                bits.append(b)
                break

    modifier = QuantizationModifier(
        config_groups={"g": {"weights": {"num_bits": 4, "strategy": "channel"}}},
        start=0,
        start_bits=6,
        target_bits=4,
        quantization_period=2,
    )
    _train(tiny_llama, modifier, token_batches, steps=8, inspect=inspect)
    # DeepSpeed's update count (step + 1) reaches 2, then 4 (doubled, absolute): 6 bits at
    # step 0, 5 bits at steps 1-2, 4 bits from step 3
    assert bits == [6, 5, 5, 4, 4, 4, 4, 4]


@pytest.mark.parametrize("bad", [float("nan")])
def test_nan_activation_in_training_is_an_error(tiny_llama, bad):
    modifier = QuantizationModifier(config_groups=W4_STATIC_A8, start=0)
    module = tiny_llama.model.layers[0].mlp.up_proj
    with create_session() as session:
        session.initialize(tiny_llama, [modifier])
        x = torch.randn(1, 2, module.in_features)
        x[0, 0, 0] = bad
        with pytest.raises(ValueError, match=r"mlp\.up_proj.*NaN or inf"):
            module(x)


@pytest.mark.parametrize(("levels", "codes"), [("ternary", {-1, 0, 1}), ("binary", {-1, 1})])
def test_ternary_and_binary_weights_train_and_save_as_2_bit_codes(
    tiny_llama, token_batches, tmp_path, levels, codes
):
    from compressed_tensors.quantization import quantize
    from transformers import AutoModelForCausalLM

    from compressor import save_compressed

    q_proj = tiny_llama.model.layers[0].self_attn.q_proj
    seen = []

    def inspect(step, model):
        seen.append(set(torch.unique(torch.sign(q_proj.weight.detach()[0])).tolist()))
        magnitude = q_proj.weight.detach()[0].abs()  # 0 or alpha (up to the STE's rounding)
        alpha = magnitude.max()
        assert torch.all((magnitude < 1e-6 * alpha) | torch.isclose(magnitude, alpha, rtol=1e-5))

    groups = {"g": {"weights": {"num_bits": 2, "strategy": "channel"}}}
    modifier = QuantizationModifier(config_groups=groups, start=0, low_bit_weights=levels)
    losses = _train(tiny_llama, modifier, token_batches[:1], steps=12, lr=0.003, inspect=inspect)
    assert losses[-1] < losses[0]
    assert seen[0] <= codes
    # frozen form: 2-bit codes of exactly those levels, scale alpha
    args = q_proj.quantization_scheme.weights
    got = quantize(q_proj.weight, q_proj.weight_scale, q_proj.weight_zero_point, args)
    assert set(torch.unique(got).tolist()) <= codes
    ids = token_batches[0]["input_ids"]
    tiny_llama.eval()
    with torch.no_grad():
        expected = tiny_llama(ids).logits
    out = save_compressed(tiny_llama, tmp_path / levels)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)


def test_low_bit_weights_need_2_bit_channel_weights():
    from compressor import Recipe, RecipeError

    args = {"scheme": "W4A16", "start": 0, "low_bit_weights": "ternary"}
    with pytest.raises(RecipeError, match="num_bits 2"):
        Recipe.from_dict({"modifiers": [{"QuantizationModifier": args}]})


def test_conv2d_weights_train_with_straight_through_gradients():
    torch.manual_seed(0)
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 2)
    )
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))
    groups = {"g": {"targets": ["Conv2d"], "weights": {"num_bits": 4, "strategy": "channel"}}}
    modifier = QuantizationModifier(config_groups=groups, ignore=[], start=0)
    optimizer = torch.optim.Adam(conv.parameters(), lr=0.01)
    original = conv[0].weight
    losses = []
    with create_session() as session:
        session.initialize(conv, [modifier], optimizer=optimizer)
        for _ in range(15):
            session.batch_start()
            loss = torch.nn.functional.cross_entropy(conv(x), y)
            loss.backward()
            assert original.grad.abs().sum() > 0
            optimizer.step()
            optimizer.zero_grad()
            session.batch_end()
            losses.append(loss.item())
        session.finalize()
    assert losses[-1] < losses[0]
    assert conv[0].weight is original
    assert all(len(torch.unique(conv[0].weight[c].detach())) <= 16 for c in range(4))
