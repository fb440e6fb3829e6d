"""The calibration forward computes exactly what compressed-tensors' quantized forward does,
reads weights and scales afresh on every call, and gives compressed-tensors' forward back."""

import copy

import pytest
import torch
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize

from compressor.modifiers.quantization.calibration import set_qparams, update_weight_qparams
from compressor.modifiers.quantization.calibration_forward import (
    CalibrationForwards,
    fake_quantize_int,
    fast_fake_quantizable,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits: equal only when the values are equal including the sign of zero."""
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_activations_match_compressed_tensors_bit_for_bit(bits, symmetric):
    torch.manual_seed(0)
    x = torch.randn(3, 50, 40) * 3
    x[0, 0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    x[1, 1, 0] = 1e4  # clamped
    args = QuantizationArgs(num_bits=bits, strategy="tensor", symmetric=symmetric)
    scale = torch.tensor([0.037])
    # ties: values exactly half-way between two grid points round to even
    x[2, 0, :4] = torch.tensor([0.5, 1.5, 2.5, -2.5]) * scale
    zero_point = torch.tensor([0 if symmetric else 3], dtype=torch.int8)
    assert fast_fake_quantizable(args, x, scale, zero_point)
    expected = fake_quantize(x, scale, zero_point, args)
    got = fake_quantize_int(x, scale, zero_point, args)
    assert torch.equal(got, expected)
    # bit for bit, but for a -0.0 input with a zero point of zeros, which stays -0.0 where
    # compressed-tensors adds the zero point and writes +0.0
    differ = _bits(got) != _bits(expected)
    assert torch.equal(differ, (x == 0) & x.signbit() & (not bool(zero_point.any())))


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_row_weights_match_compressed_tensors_bit_for_bit(symmetric):
    torch.manual_seed(1)
    w = torch.randn(24, 40) * torch.rand(24, 1) * 4
    args = QuantizationArgs(num_bits=8, strategy="channel", symmetric=symmetric)
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    zero_point = torch.randint(-3, 4, (24, 1), dtype=torch.int8) if not symmetric else None
    assert fast_fake_quantizable(args, w, scale, zero_point)
    expected = fake_quantize(w, scale, zero_point, args)
    assert torch.equal(_bits(fake_quantize_int(w, scale, zero_point, args)), _bits(expected))


def test_other_schemes_are_left_to_compressed_tensors():
    x = torch.randn(4, 32)
    one = torch.tensor([0.1])
    group = QuantizationArgs(num_bits=4, strategy="group", group_size=16)
    fp8 = QuantizationArgs(num_bits=8, type="float", strategy="tensor")
    tensor = QuantizationArgs(num_bits=8, strategy="tensor")
    assert not fast_fake_quantizable(group, x, torch.ones(4, 2), None)
    assert not fast_fake_quantizable(fp8, x, one, None)
    assert not fast_fake_quantizable(tensor, x, one, None, global_scale=one)
    assert not fast_fake_quantizable(tensor, x, one.half(), None)  # scale in another dtype
    assert not fast_fake_quantizable(tensor, x, torch.ones(2), None)
    assert fast_fake_quantizable(tensor, x, one, None)


def _quantized_linear(scheme: str = "W8A8", static: bool = True) -> torch.nn.Module:
    """A Linear with compressed-tensors quantization attached, weight and input scales set."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    from compressor.modifiers.quantization.matching import apply_quantization

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24))
    group = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, strategy="channel", symmetric=True),
        input_activations=QuantizationArgs(
            num_bits=8, strategy="tensor", symmetric=True, dynamic=not static
        )
        if scheme == "W8A8"
        else None,
    )
    apply_quantization(model, QuantizationConfig(config_groups={"g": group}))
    linear = model[0]
    update_weight_qparams(linear, "0")
    if static and scheme == "W8A8":
        args = group.input_activations
        set_qparams(linear, "input", torch.tensor([-2.0]), torch.tensor([3.0]), args, "0")
    return linear


@pytest.mark.parametrize(("scheme", "static"), [("W8A8", True), ("W8A8", False), ("W8A16", True)])
def test_the_module_computes_what_compressed_tensors_computes(scheme, static):
    linear = _quantized_linear(scheme, static)
    reference = copy.deepcopy(linear)
    x = torch.randn(2, 7, 40) * 2
    forwards = CalibrationForwards()
    assert forwards.install([linear]) == 1
    for enabled in (True, False):
        linear.quantization_enabled = enabled
        reference.quantization_enabled = enabled
        assert torch.equal(_bits(linear(x)), _bits(reference(x)))
    forwards.remove()
    assert linear.forward.__func__.__code__.co_name == "quantized_forward"


def test_a_changed_weight_or_scale_is_read_by_the_next_forward():
    """Nothing is cached: GPTQ's and SmoothQuant's writes between forwards take effect."""
    linear = _quantized_linear()
    forwards = CalibrationForwards()
    forwards.install([linear])
    x = torch.randn(5, 40)
    before = linear(x)
    # a write through update_offload_parameter (as GPTQ and the smoothing fold do)
    update_offload_parameter(linear, "weight", linear.weight * 0.5)
    update_weight_qparams(linear, "0")
    halved = linear(x)
    assert not torch.equal(halved, before)
    # a write that bypasses autograd's version counter
    linear.weight.data.mul_(2.0)
    linear.weight_scale.data.mul_(2.0)
    assert torch.allclose(linear(x), before, atol=1e-5)
    # the input scale
    linear.input_scale.data.mul_(4.0)
    reference = copy.deepcopy(linear)
    forwards.remove()
    expected = reference(x)
    forwards.install([linear])
    assert torch.equal(linear(x), expected)
    assert not torch.equal(expected, before)


def test_only_plain_linears_with_compressed_tensors_forward_get_it():
    linear = _quantized_linear()
    plain = torch.nn.Linear(4, 4)  # no quantized forward

    class Custom(torch.nn.Linear):
        def forward(self, input):
            return super().forward(input) + 1

    custom = Custom(4, 4)
    custom.forward = linear.forward  # even with a borrowed quantized forward
    forwards = CalibrationForwards()
    assert forwards.install([linear, plain, custom]) == 1
    assert len(forwards) == 1


def test_an_input_read_by_several_modules_is_fake_quantized_once_per_scale():
    """q/k/v read one tensor: with equal input scales the result is computed once; another
    scale, or the tensor changed in place, computes it again; values as compressed-tensors'."""
    first, second, third = (_quantized_linear() for _ in range(3))
    references = [copy.deepcopy(m) for m in (first, second, third)]
    third.input_scale.data.mul_(2.0)
    references[2].input_scale.data.mul_(2.0)
    forwards = CalibrationForwards()
    forwards.install([first, second, third])
    x = torch.randn(6, 40) * 3
    before = x.clone()
    computed = []
    import compressor.modifiers.quantization.calibration_forward as forward_module

    original = forward_module.fake_quantize_int

    def counting(value, *args):
        computed.append(value)
        return original(value, *args)

    forward_module.fake_quantize_int = counting
    try:
        outputs = [m(x) for m in (first, second, third)]
        inputs_quantized = sum(1 for v in computed if v is x)
        x.mul_(1.5)  # in place: not the tensor the entry saw
        again = first(x)
        inputs_after = sum(1 for v in computed if v is x)
    finally:
        forward_module.fake_quantize_int = original
    assert inputs_quantized == 2  # first (shared with second), third (its own scale)
    assert inputs_after == 3
    forwards.remove()
    expected = [r(before) for r in references]
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(again, references[0](x), rtol=0, atol=0)


def test_the_shared_input_and_its_result_are_not_held_once_the_input_is_dropped():
    """The entry that lets q/k/v share one fake-quantized input lives as long as the input:
    dropped, the input's memory (a view keeps its whole base alive) and the result's go
    back at once (no garbage collection needed)."""
    import weakref

    first, second = _quantized_linear(), _quantized_linear()
    forwards = CalibrationForwards()
    forwards.install([first, second])
    base = torch.randn(10, 40) * 3
    x = base[2:8]
    first(x)
    entry = forwards._last.entry
    assert entry is not None
    result = weakref.ref(entry[5])
    held = weakref.ref(base)
    del entry, x, base
    assert forwards._last.entry is None
    assert held() is None and result() is None
    forwards.remove()


@pytest.mark.parametrize("inputs", ["static", "dynamic", "none"])
def test_gptq_calibrates_with_the_fast_forward_and_the_same_result(monkeypatch, inputs):
    """GPTQ with static int8 input activations (SmoothQuant's W8A8 recipes) runs its
    calibration's quantized forwards on the fast path, and the weights, scales and zero points
    come out bit for bit as with compressed-tensors' forward; the modules get
    compressed-tensors' forward back at the end."""
    from datasets import Dataset
    from transformers import LlamaForCausalLM

    import compressor.modifiers.quantization.calibration_forward as calibration_forward
    from compressor import oneshot
    from compressor.modifiers import GPTQModifier
    from conftest import tiny_llama_config

    group = {"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"}}
    if inputs != "none":
        group["input_activations"] = {"num_bits": 8, "strategy": "tensor" if inputs == "static"
                                      else "token", "dynamic": inputs == "dynamic"}  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 128, (8, 32), generator=gen)})
    fast_calls = []
    real = calibration_forward.fake_quantize_int

    def counted(*args, **kwargs):
        fast_calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration_forward, "fake_quantize_int", counted)
    states = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(CalibrationForwards, "install", lambda self, modules: 0)
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config()).eval()
        oneshot(model, [GPTQModifier(config_groups={"g": group}, ignore=["lm_head"])], data)
        q_proj = model.model.layers[0].self_attn.q_proj
        assert q_proj.forward.__func__.__code__.co_name == "quantized_forward"
        states.append(model.state_dict())
        if fast:
            assert bool(fast_calls) == (inputs == "static")
    ours, reference = states
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[key], reference[key]) for key in ours)
