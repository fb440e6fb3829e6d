"""Post-training quantization driven through the session by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from compressed_tensors.quantization import QuantizationStatus, fake_quantize, quantize

from compressor import create_session
from compressor.modifiers import QuantizationModifier


def _calibrate(model, modifier, batches):
    with create_session() as session:
        session.initialize(model, [modifier])
        session.calibration_epoch_start()
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        session.calibration_epoch_end()
        session.finalize()
    return model


def _weight_codes(module):
    args = module.quantization_scheme.weights
    zp = getattr(module, "weight_zero_point", None)
    return quantize(module.weight, module.weight_scale, zp, args, dtype=torch.float32), args


@pytest.mark.parametrize(("scheme", "bits", "group"), [("W4A16", 4, 16), ("W8A8", 8, None)])
def test_int_weights_take_at_most_2_to_the_bits_values_per_group(
    tiny_llama, token_batches, scheme, bits, group
):
    if group is not None:  # W4A16's group 128 does not fit the 32-wide tiny model
        kwargs = {"config_groups": {"g": {"weights": {"num_bits": 4, "group_size": group}}}}
    else:
        kwargs = {"scheme": scheme}
    model = _calibrate(tiny_llama, QuantizationModifier(**kwargs), token_batches)
    module = model.model.layers[1].mlp.down_proj
    assert module.quantization_status == QuantizationStatus.FROZEN
    codes, args = _weight_codes(module)
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    rows = codes if group is None else codes.unflatten(-1, (-1, group))
    per_group = rows.reshape(-1, rows.shape[-1])
    distinct = max(len(torch.unique(g)) for g in per_group)
    assert distinct <= 2**bits
    # the forward uses exactly those values: dequantized codes times the scale
    zp = getattr(module, "weight_zero_point", None)
    effective = fake_quantize(module.weight, module.weight_scale, zp, args)
    assert len(torch.unique(effective[0, : group or effective.shape[1]])) <= 2**bits


@pytest.mark.parametrize(
    ("scheme", "tolerance"), [("W8A8", 0.02), ("FP8_DYNAMIC", 0.08), ("FP8", 0.08)]
)
def test_outputs_stay_close_to_the_float_model(tiny_llama, token_batches, scheme, tolerance):
    reference = copy.deepcopy(tiny_llama)
    ids = token_batches[0]["input_ids"]
    with torch.no_grad():
        expected = reference(ids).logits
    model = _calibrate(tiny_llama, QuantizationModifier(scheme=scheme), token_batches)
    with torch.no_grad():
        got = model(ids).logits
    error = (got - expected).abs().max().item()
    assert 0 < error < tolerance * expected.abs().max().item()


def test_w4a16_changes_outputs_more_than_w8a16(tiny_llama, token_batches):
    ids = token_batches[0]["input_ids"]
    with torch.no_grad():
        expected = tiny_llama(ids).logits
    errors = {}
    for bits in (4, 8):
        model = copy.deepcopy(tiny_llama)
        groups = {"g": {"weights": {"num_bits": bits, "group_size": 16}}}
        _calibrate(model, QuantizationModifier(config_groups=groups), token_batches)
        with torch.no_grad():
            errors[bits] = (model(ids).logits - expected).abs().mean().item()
    assert errors[8] < errors[4] / 4


def test_dynamic_activations_are_quantized_per_token(tiny_llama, token_batches):
    model = _calibrate(tiny_llama, QuantizationModifier(scheme="W8A8"), token_batches)
    module = model.model.layers[0].mlp.up_proj
    x = torch.randn(1, 2, module.in_features)
    x[0, 1] *= 1000.0  # a loud token must not coarsen the quiet one's grid
    with torch.no_grad():
        got = module(x)
    scale = x.abs().amax(dim=-1, keepdim=True) / 127.5
    x_q = torch.clamp(torch.round(x / scale), -128, 127) * scale
    codes, args = _weight_codes(module)
    w_q = codes * module.weight_scale
    expected = torch.nn.functional.linear(x_q, w_q)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    # a per-tensor scale would have rounded the quiet token to zero
    assert got[0, 0].abs().max() > 0


def test_static_activation_ranges_come_from_calibration(tiny_llama, token_batches):
    seen: list[torch.Tensor] = []
    module = tiny_llama.model.layers[0].self_attn.o_proj
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    model = _calibrate(tiny_llama, QuantizationModifier(scheme="FP8"), token_batches)
    handle.remove()
    assert len(seen) == len(token_batches)
    peak = max(x.abs().max() for x in seen)
    assert torch.allclose(module.input_scale, peak / 448.0, rtol=1e-5)
    # frozen: later, louder batches do not move the scale
    before = module.input_scale.clone()
    with torch.no_grad():
        model(input_ids=token_batches[0]["input_ids"] % 7)
    assert torch.equal(module.input_scale, before)
    assert module.quantization_status == QuantizationStatus.FROZEN


def test_moving_average_observer_weights_the_running_range(tiny_llama, token_batches):
    ranges: list[torch.Tensor] = []
    module = tiny_llama.model.layers[0].self_attn.o_proj
    handle = module.register_forward_pre_hook(lambda _m, a: ranges.append(a[0].abs().max()))
    modifier = QuantizationModifier(scheme="FP8", observer="moving_average", momentum=0.5)
    _calibrate(tiny_llama, modifier, token_batches[:2])
    handle.remove()
    # symmetric FP8: scale = max(|min|, |max|) of the averaged range / 448, which is at most
    # the mean of the two batches' peaks (min-max would give the larger peak)
    low, high = sorted(r.item() for r in ranges)
    assert low < high
    value = module.input_scale.item() * 448.0
    assert value <= (low + high) / 2 * (1 + 1e-5)


def test_static_ranges_without_calibration_is_an_error(tiny_llama):
    with create_session() as session:
        session.initialize(tiny_llama, [QuantizationModifier(scheme="FP8")])
        with pytest.raises(RuntimeError, match="no calibration ran"):
            session.finalize()


def test_calibration_with_no_batches_names_the_unseen_modules(tiny_llama):
    with create_session() as session:
        session.initialize(tiny_llama, [QuantizationModifier(scheme="FP8")])
        session.calibration_epoch_start()
        with pytest.raises(RuntimeError, match="q_proj"):
            session.calibration_epoch_end()


def test_weight_only_quantization_needs_no_calibration_events(tiny_llama):
    groups = {"g": {"weights": {"num_bits": 4, "group_size": 16}}}
    with create_session() as session:
        session.initialize(tiny_llama, [QuantizationModifier(config_groups=groups)])
        session.finalize()
    module = tiny_llama.model.layers[0].self_attn.q_proj
    assert module.quantization_status == QuantizationStatus.FROZEN
    codes, _ = _weight_codes(module)
    assert len(torch.unique(codes)) <= 16


def test_all_zero_weight_group_quantizes_to_zero(tiny_llama, token_batches):
    module = tiny_llama.model.layers[0].mlp.gate_proj
    with torch.no_grad():
        module.weight[3, :16] = 0.0
    groups = {"g": {"weights": {"num_bits": 4, "group_size": 16}}}
    _calibrate(tiny_llama, QuantizationModifier(config_groups=groups), token_batches)
    assert module.weight_scale[3, 0] > 0  # a small positive scale, not zero
    zp = getattr(module, "weight_zero_point", None)
    effective = fake_quantize(
        module.weight, module.weight_scale, zp, module.quantization_scheme.weights
    )
    assert torch.isfinite(effective).all()
    assert torch.equal(effective[3, :16], torch.zeros(16))


def test_nan_weight_is_an_error_naming_the_layer(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    with create_session() as session:
        session.initialize(tiny_llama, [QuantizationModifier(scheme="W8A8")])
        with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj.*NaN or inf"):
            session.finalize()


def test_inf_activation_is_an_error_naming_the_layer(tiny_llama, token_batches):
    module = tiny_llama.model.layers[0].self_attn.q_proj
    with create_session() as session:
        session.initialize(tiny_llama, [QuantizationModifier(scheme="FP8")])
        session.calibration_epoch_start()
        x = torch.randn(1, 3, module.in_features)
        x[0, 0, 0] = float("inf")
        with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj.*input.*NaN or inf"):
            module(x)


def test_hooks_are_removed_and_an_ignored_lm_head_is_left_alone(tiny_llama, token_batches):
    modifier = QuantizationModifier(scheme="FP8", ignore=["lm_head"])
    _calibrate(tiny_llama, modifier, token_batches)
    assert modifier.num_hooks == 0
    assert not hasattr(tiny_llama.lm_head, "quantization_scheme")
    assert all(not m._forward_pre_hooks for m in tiny_llama.modules())


def test_embedding_gets_one_scale_per_token_row(tiny_llama):
    groups = {"emb": {"targets": ["Embedding"], "weights": {"num_bits": 4, "strategy": "channel"}}}
    with create_session() as session:
        session.initialize(tiny_llama, [QuantizationModifier(config_groups=groups)])
        session.finalize()
    embed = tiny_llama.model.embed_tokens
    assert embed.weight_scale.shape == (embed.num_embeddings, 1)
    ids = torch.tensor([[5, 9]])
    with torch.no_grad():
        rows = embed(ids)[0]
    for row, token in zip(rows, (5, 9), strict=True):
        own_scale = embed.weight[token].abs().max() / 7.5  # symmetric 4-bit, this row's peak
        codes = row / own_scale
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.min() >= -8 and codes.max() <= 7


class _TinyConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.head = torch.nn.Linear(8 * 6 * 6, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_conv2d_weights_take_their_quantized_values(token_batches):
    torch.manual_seed(0)
    model = _TinyConvNet()
    weight = model.conv.weight.detach().clone()
    groups = {
        "g": {"targets": ["Conv2d", "Linear"], "weights": {"num_bits": 4, "strategy": "channel"}}
    }
    modifier = QuantizationModifier(config_groups=groups, ignore=[])
    _calibrate(model, modifier, [{"x": torch.randn(2, 3, 8, 8)}])
    conv = model.conv.weight.detach()
    for channel in range(8):
        scale = weight[channel].abs().max() / 7.5
        codes = conv[channel] / scale
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert len(torch.unique(codes.round())) <= 16
    assert model.head.quantization_status == QuantizationStatus.FROZEN
    assert modifier.num_hooks == 0


def test_conv2d_activations_are_rejected():
    groups = {
        "g": {
            "targets": ["Conv2d"],
            "weights": {"num_bits": 8},
            "input_activations": {"num_bits": 8, "dynamic": True, "strategy": "token"},
        }
    }
    with create_session() as session, pytest.raises(ValueError, match="conv.*weights-only"):
        session.initialize(_TinyConvNet(), [QuantizationModifier(config_groups=groups)])


def test_weight_scales_are_set_on_one_cpu_thread_with_the_same_result(tiny_llama, monkeypatch):
    """A min and a max per weight: one thread gives the same scales, and does not stall when
    other processes share the cores; the caller's thread count is restored."""
    from compressor.modifiers.quantization import calibration

    real = calibration.weight_range
    seen: list[int] = []

    def spied(weight, args):
        seen.append(torch.get_num_threads())
        return real(weight, args)

    monkeypatch.setattr(calibration, "weight_range", spied)
    groups = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 16}}}
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = _calibrate(tiny_llama, QuantizationModifier(config_groups=groups), [])
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    q_proj = model.model.layers[0].self_attn.q_proj
    grouped = q_proj.weight.detach().reshape(q_proj.weight.shape[0], -1, 16)
    expected = grouped.abs().amax(dim=-1) / 7.5  # symmetric int4: the range over 15 steps
    torch.testing.assert_close(q_proj.weight_scale, expected, rtol=1e-6, atol=0)
