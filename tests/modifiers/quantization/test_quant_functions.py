"""The pure functions beside QuantizationModifier: ranges, observers, schedules, STE."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs

from compressor.modifiers.quantization.fake_quant import (
    binarize,
    fake_quantize_activation,
    fake_quantize_weight,
    straight_through,
    ternarize,
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


def test_make_observer_reads_llmcompressor_names():
    """llm-compressor's names: minmax a moving average with averaging_constant (0.01 unless
    given; 1 keeps the last batch), memoryless_minmax the last batch; a preset's names are
    not read (prefer_args False), the modifier's kind is used."""
    obs = make_observer(QuantizationArgs(observer="minmax"), "minmax", 0.95)
    assert obs.kind == "moving_average" and obs.momentum == pytest.approx(0.99)
    args = QuantizationArgs(observer="minmax", observer_kwargs={"averaging_constant": 0.25})
    assert make_observer(args, "minmax", 0.95).momentum == pytest.approx(0.75)
    args = QuantizationArgs(observer="minmax", observer_kwargs={"averaging_constant": 1.0})
    assert make_observer(args, "minmax", 0.95).kind == "last"
    assert make_observer(QuantizationArgs(observer="memoryless_minmax"), "minmax", 0.9).kind == (
        "last"
    )
    assert make_observer(QuantizationArgs(observer="minmax"), "minmax", 0.9, False).kind == (
        "minmax"
    )
    last = RangeObserver(kind="last")
    for value in (3.0, 1.0):
        last.update(torch.tensor([-value]), torch.tensor([value]))
    assert last.range[1].item() == 1.0


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


def _scale_of_each_weight(w: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """The symmetric 4-bit scale (max |w| of the weight's group or block / 7.5) of every
    entry of ``w``, computed one group or block at a time."""
    scale = torch.empty_like(w)
    rows, cols = (1, args.group_size) if args.strategy == "group" else args.block_structure
    for r in range(0, w.shape[0], rows):
        for c in range(0, w.shape[1], cols):
            part = w[r : r + rows, c : c + cols]
            scale[r : r + rows, c : c + cols] = part.abs().max() / 7.5
    return scale


@pytest.mark.parametrize(
    "args",
    [
        QuantizationArgs(num_bits=4, group_size=4),
        QuantizationArgs(num_bits=4, strategy="block", block_structure=[2, 4]),
    ],
    ids=["group", "block"],
)
def test_stochastic_rounding_picks_a_neighbouring_grid_point_of_each_group(args):
    """Each weight rounds to one of the two points of its own group's (or block's) grid
    around it, up with probability equal to the fractional part: groups of very different
    magnitudes side by side, and a row count the blocks do not divide."""
    torch.manual_seed(0)
    magnitude = torch.tensor([0.01, 1.0, 100.0]).repeat_interleave(4)  # per group of 4
    w = torch.randn(5, 12) * magnitude
    scale = _scale_of_each_weight(w, args)
    codes = w / scale
    samples = torch.stack([fake_quantize_weight(w, args, stochastic=True) for _ in range(2000)])
    sampled_codes = samples / scale
    down, up = codes.floor(), codes.ceil()
    near = lambda a, b: (a - b).abs() < 1e-3  # noqa: E731
    assert (near(sampled_codes, down) | near(sampled_codes, up)).all()
    # unbiased: the mean lands on the weight (the largest entry of each group, at the edge
    # of the grid, is clamped, so it is left out)
    inside = codes.abs() < 7.4
    mean_error = (sampled_codes.mean(0) - codes).abs()[inside]
    assert mean_error.max() < 0.06
    assert ((codes - codes.round()).abs()[inside] > 0.2).any()  # not nearest rounding


def test_ternary_weights_keep_what_exceeds_0_7_of_the_mean_magnitude():
    """Ternary Weight Networks: per row, weights with |w| > 0.7 mean|w| become +-alpha (the
    mean magnitude of those kept), the rest 0; per tensor with one threshold for all."""
    torch.manual_seed(0)
    w = torch.randn(6, 40) * torch.rand(6, 1) * 3
    for per_tensor in (False, True):
        rows = w.reshape(1, -1) if per_tensor else w
        expected = torch.zeros_like(rows)
        for i, row in enumerate(rows.tolist()):
            threshold = 0.7 * sum(abs(v) for v in row) / len(row)
            kept = [abs(v) for v in row if abs(v) > threshold]
            alpha = sum(kept) / len(kept)
            expected[i] = (
                torch.tensor([(v > 0) - (v < 0) if abs(v) > threshold else 0 for v in row]) * alpha
            )
        got, alpha = ternarize(w, per_tensor=per_tensor)
        torch.testing.assert_close(got, expected.reshape(w.shape))
        assert alpha.shape == ((1, 1) if per_tensor else (6, 1))
    # the data has weights between 0.5 and 0.7 of the mean magnitude: the threshold matters
    share = w.abs() / w.abs().mean(dim=1, keepdim=True)
    assert ((share > 0.5) & (share <= 0.7)).any()


def test_ternary_and_binary_weights_of_an_all_zero_row_stay_zero():
    w = torch.randn(3, 8)
    w[1] = 0.0
    for low_bit in (ternarize, binarize):
        got, alpha = low_bit(w)
        assert torch.isfinite(got).all() and torch.isfinite(alpha).all(), low_bit.__name__
        assert (got[1] == 0).all() and alpha[1].item() == 0.0


def test_binary_weights_are_the_sign_times_the_mean_magnitude_and_zero_stays_zero():
    """XNOR-Net's alpha * sign(w) per row, alpha = mean |w|; a weight of exactly 0 (a
    pruned one) stays 0, as DeepSpeed's XTC computes it."""
    w = torch.tensor([[0.5, -2.0, 0.0, 1.5], [-1.0, 0.0, 0.0, 3.0]])
    got, alpha = binarize(w)
    mean = w.abs().mean(dim=1, keepdim=True)
    assert torch.equal(alpha, mean)
    expected = torch.where(w > 0, mean, torch.where(w < 0, -mean, torch.zeros_like(w)))
    assert torch.equal(got, expected)
    per_tensor, alpha = binarize(w, per_tensor=True)
    assert torch.equal(per_tensor, torch.sign(w) * w.abs().mean())
    assert alpha.shape == (1, 1)


def test_stochastic_rounding_of_a_float_grid_is_refused():
    """Float grids are not evenly spaced: one step of noise per scale would not round them
    stochastically."""
    fp8 = QuantizationArgs(num_bits=8, type="float", strategy="channel")
    with pytest.raises(ValueError, match="int quantization only"):
        fake_quantize_weight(torch.randn(4, 8), fp8, stochastic=True)


def test_static_activation_quantization_without_a_scale_is_refused():
    static = QuantizationArgs(num_bits=8, dynamic=False)
    with pytest.raises(ValueError, match="static activation quantization needs a scale"):
        fake_quantize_activation(torch.randn(2, 4, 8), static)
