"""The pure functions beside QuantizationModifier: ranges, observers, schedules, STE."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs

from compressor.modifiers.quantization.fake_quant import (
    fake_quantize_weight,
    straight_through,
)
from compressor.modifiers.quantization.observers import (
    RangeObserver,
    activation_range,
    make_observer,
    weight_range,
)
from compressor.modifiers.quantization.progressive import bit_drop_steps, progressive_bits


@pytest.mark.parametrize(
    ("args", "shape"),
    [
        (QuantizationArgs(num_bits=8), (1,)),
        (QuantizationArgs(num_bits=8, strategy="channel"), (6, 1)),
        (QuantizationArgs(num_bits=4, group_size=4), (6, 3)),
        (QuantizationArgs(num_bits=8, strategy="block", block_structure=[4, 4]), (2, 3)),
    ],
)
def test_weight_range_has_the_scale_shape(args, shape):
    w = torch.randn(6, 12)
    lo, hi = weight_range(w, args)
    assert lo.shape == shape and hi.shape == shape
    assert torch.all(lo <= hi)
    assert lo.min() == w.min() and hi.max() == w.max()


def test_group_range_is_per_group():
    w = torch.arange(8.0).reshape(1, 8)
    lo, hi = weight_range(w, QuantizationArgs(num_bits=4, group_size=4))
    assert lo.tolist() == [[0.0, 4.0]] and hi.tolist() == [[3.0, 7.0]]


def test_activation_range_reduces_over_tokens():
    x = torch.tensor([[[1.0, -2.0, 3.0, 0.5]], [[-1.0, 4.0, 0.0, 0.0]]])
    lo, hi = activation_range(x, QuantizationArgs(num_bits=8, group_size=2))
    assert lo.tolist() == [-2.0, 0.0] and hi.tolist() == [4.0, 3.0]


def test_observers_minmax_and_moving_average():
    minmax = RangeObserver(kind="minmax")
    average = RangeObserver(kind="moving_average", momentum=0.9)
    for value in (1.0, 3.0):
        for obs in (minmax, average):
            obs.update(torch.tensor([-value]), torch.tensor([value]))
    assert minmax.range[1].item() == 3.0
    assert average.range[1].item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)
    with pytest.raises(RuntimeError, match="no batch"):
        _ = RangeObserver().range


def test_make_observer_reads_args_and_rejects_unknown():
    obs = make_observer(QuantizationArgs(observer="static_minmax"), "moving_average", 0.95)
    assert obs.kind == "minmax"
    obs = make_observer(
        QuantizationArgs(observer="moving_average", observer_kwargs={"momentum": 0.5}),
        "minmax",
        0.95,
    )
    assert obs.kind == "moving_average" and obs.momentum == 0.5
    with pytest.raises(ValueError, match="observer='mse'"):
        make_observer(QuantizationArgs(observer="mse"), "minmax", 0.95)


def test_progressive_bits_schedule():
    got = [progressive_bits(s, 8, 4, 3) for s in range(0, 50)]
    # DeepSpeed's updates: the forward of step s has seen s + 1; drops when that reaches
    # 3, 6, 12, 24 (absolute, doubling), i.e. at steps 2, 5, 11, 23
    assert got[:3] == [8, 8, 7] and got[4] == 7 and got[5] == 6
    assert got[10] == 6 and got[11] == 5 and got[22] == 5 and got[23] == 4 and got[49] == 4
    assert bit_drop_steps(8, 4, 3) == [2, 5, 11, 23]
    # period 1: the first quantized forward is already one bit down
    assert [progressive_bits(s, 8, 4, 1) for s in range(9)] == [7, 6, 6, 5, 5, 5, 5, 4, 4]
    assert progressive_bits(-3, 8, 4, 1) == 7  # negative steps count as 0
    with pytest.raises(ValueError, match="period"):
        progressive_bits(0, 8, 4, 0)
    with pytest.raises(ValueError, match="target_bits=8 exceeds start_bits=4"):
        bit_drop_steps(4, 8, 2)


def test_straight_through_keeps_forward_value_and_identity_gradient():
    x = torch.randn(5, requires_grad=True)
    y = straight_through(x, torch.round(x.detach()))
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(5))


def test_stochastic_rounding_is_unbiased():
    torch.manual_seed(0)
    args = QuantizationArgs(num_bits=4, strategy="channel")
    w = torch.tensor([[7.0, 0.3, -0.6, 1.25]])  # scale = 7 / 7.5
    nearest = fake_quantize_weight(w, args)
    samples = torch.stack([fake_quantize_weight(w, args, stochastic=True) for _ in range(4000)])
    assert torch.allclose(samples.mean(0)[0, 1:], w[0, 1:], atol=0.03)
    assert not torch.allclose(nearest[0, 1:], w[0, 1:], atol=0.03)


def test_conv_weights_are_quantized_per_output_channel():
    args = QuantizationArgs(num_bits=4, strategy="channel")
    w = torch.randn(3, 2, 3, 3)
    q = fake_quantize_weight(w, args)
    assert q.shape == w.shape
    assert all(len(torch.unique(q[c])) <= 16 for c in range(3))
