"""The fused symmetric-integer fake quantizer used in training equals compressed-tensors."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs

from compressor.modifiers.quantization.fake_quant import (
    fake_quantize_activation,
    fake_quantize_weight,
    fused_fake_quantize,
)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_weights_match_compressed_tensors_bit_for_bit(bits, strategy):
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.rand(64, 1) * 4
    w[5] = 0.0  # an all-zero row gets the epsilon scale
    args = QuantizationArgs(num_bits=bits, strategy=strategy, symmetric=True)
    expected = fake_quantize_weight(w, args)
    got = fused_fake_quantize(w, args, "weight")
    assert got is not None and torch.equal(got, expected)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("strategy", ["token", "tensor"])
def test_dynamic_activations_match_compressed_tensors_bit_for_bit(bits, strategy):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 48) * torch.rand(2, 16, 1) * 4
    args = QuantizationArgs(num_bits=bits, strategy=strategy, symmetric=True, dynamic=True)
    expected = fake_quantize_activation(x, args)
    got = fused_fake_quantize(x, args, "activation")
    assert got is not None and torch.equal(got, expected)


def test_the_gradient_passes_straight_through():
    w = torch.randn(8, 16, requires_grad=True)
    args = QuantizationArgs(num_bits=4, strategy="channel", symmetric=True)
    out = fused_fake_quantize(w, args, "weight")
    (out * torch.arange(16.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(16.0).expand(8, 16))


def test_other_schemes_take_the_general_path_and_nan_is_an_error():
    asym = QuantizationArgs(num_bits=8, strategy="channel", symmetric=False)
    group = QuantizationArgs(num_bits=4, strategy="group", group_size=16, symmetric=True)
    fp8 = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
    # a scale stored in half precision is rounded to it before use: not the fused arithmetic
    half_scale = QuantizationArgs(
        num_bits=8, strategy="channel", symmetric=True, scale_dtype=torch.float16
    )
    w = torch.randn(8, 32)
    others = (asym, group, fp8, half_scale)
    assert all(fused_fake_quantize(w, a, "weight") is None for a in others)
    bad = w.clone()
    bad[0, 0] = float("nan")
    sym = QuantizationArgs(num_bits=8, strategy="channel", symmetric=True)
    with pytest.raises(ValueError, match="layer.q_proj.*NaN"):
        fused_fake_quantize(bad, sym, "weight", "layer.q_proj")
