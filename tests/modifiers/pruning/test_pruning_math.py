import pytest
import torch

from compressor.modifiers.hooks import HooksMixin
from compressor.modifiers.pruning.masks import MaskHolder, expand_unit_mask
from compressor.modifiers.pruning.schedule import density_at, kept_count
from compressor.modifiers.pruning.scores import (
    activation_scores,
    binarize_topk,
    input_square_sums,
    nm_mask,
    topk_mask,
    unit_scores,
)


def test_cubic_ramp_is_fast_first_then_slow_and_hits_both_ends():
    kw = dict(start=0, end=10, init_density=1.0, final_density=0.2)
    values = [density_at(i, **kw) for i in range(12)]
    assert values[0] == 1.0 and values[10] == pytest.approx(0.2) and values[11] == 0.2
    drops = [a - b for a, b in zip(values, values[1:10], strict=False)]
    assert all(d > 0 for d in drops) and drops == sorted(drops, reverse=True)
    assert density_at(5, ramp="linear", **kw) == pytest.approx(0.6)
    assert density_at(3, start=None, end=None, init_density=1.0, final_density=0.4) == 0.4


def test_kept_count_rounds_and_never_empties():
    assert kept_count(172, 0.5) == 86 and kept_count(4, 0.3) == 1 and kept_count(3, 0.01) == 1
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 0"):
        kept_count(4, 0)


def test_nm_mask_keeps_the_largest_two_of_every_four():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    mask = nm_mask(scores, 2, 4)
    assert mask.tolist() == [[True, False, True, False, False, True, True, False]]
    with pytest.raises(ValueError, match="divisible by 4"):
        nm_mask(torch.ones(2, 6), 2, 4)


def test_topk_and_unit_scores():
    scores = torch.arange(12.0).view(3, 4)
    assert topk_mask(scores, 5).sum() == 5 and topk_mask(scores, 5)[2].all()
    assert unit_scores(scores, 0, 3).tolist() == [6.0, 22.0, 38.0]
    assert unit_scores(scores, 1, 2).tolist() == [1 + 4 + 5 + 8 + 9, 2 + 3 + 6 + 7 + 10 + 11]
    with pytest.raises(ValueError, match="3 units do not divide a dimension of size 4"):
        unit_scores(scores, 1, 3)


def test_activation_scores_weigh_columns_by_input_norm():
    weight = torch.ones(2, 3)
    scores = activation_scores(weight, torch.tensor([1.0, 4.0, 9.0]))
    assert scores.tolist() == [[1.0, 2.0, 3.0]] * 2


def test_input_square_sums_add_each_input_feature_over_every_position():
    linear_input = torch.arange(24.0).view(2, 3, 4)  # (batch, tokens, features)
    expected = linear_input.pow(2).sum(dim=(0, 1))
    assert torch.equal(input_square_sums(linear_input), expected)
    conv_input = torch.arange(2 * 3 * 5 * 5.0).view(2, 3, 5, 5)  # (batch, channels, h, w)
    sums = input_square_sums(conv_input.half(), conv=True)
    assert sums.dtype == torch.float32
    assert torch.equal(sums, conv_input.half().float().pow(2).sum(dim=(0, 2, 3)))


def test_straight_through_binarize_is_exact_and_passes_gradients():
    scores = torch.tensor([0.3, -1.0, 2.0, 0.1], requires_grad=True)
    mask = binarize_topk(scores, 2)
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    (mask * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert scores.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_expand_unit_mask_makes_contiguous_blocks():
    mask = expand_unit_mask(torch.tensor([True, False]), torch.Size([4, 3]), 0)
    assert mask.shape == (4, 1) and mask.view(-1).tolist() == [True, True, False, False]


def test_mask_holder_masks_gradients_and_survives_momentum():
    owner = HooksMixin()
    layer = torch.nn.Linear(4, 4)
    mask = torch.rand(4, 4) > 0.5
    holder = MaskHolder(owner)
    holder.set(layer.weight, mask)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        layer(torch.randn(3, 4)).pow(2).sum().backward()
        assert (layer.weight.grad[~mask] == 0).all()
        opt.step()
        opt.zero_grad()
        holder.reapply()
        assert (layer.weight[~mask] == 0).all()
    owner.remove_hooks()
    layer(torch.randn(3, 4)).sum().backward()
    assert (layer.weight.grad[~mask] != 0).any()


def test_mask_holder_fills_pruned_second_moments_without_changing_kept_weights():
    # pruned entries' second moments would decay to exact zeros, whose square root is slow
    # on CPU; they are set to 1 once, and the kept weights train exactly as without it
    torch.manual_seed(0)
    mask = torch.rand(8, 8) > 0.5
    layers = [torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)]
    layers[1].load_state_dict(layers[0].state_dict())
    runs = []
    for layer, fill in zip(layers, (True, False), strict=True):
        holder = MaskHolder(HooksMixin())
        holder.set(layer.weight, mask)
        opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
        for step in range(4):
            x = torch.randn(3, 8, generator=torch.Generator().manual_seed(step))
            layer(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
            holder.reapply(opt if fill else None)
        runs.append((layer.weight.detach(), opt.state[layer.weight]["exp_avg_sq"]))
    (filled_w, filled_v), (plain_w, plain_v) = runs
    assert torch.equal(filled_w, plain_w) and (filled_w[~mask] == 0).all()
    # set to 1 after the first step, then decayed by beta2 = 0.999 in each of three more
    torch.testing.assert_close(filled_v[~mask], torch.full_like(filled_v[~mask], 0.999**3))
    assert (plain_v[~mask] == 0).all()
    assert torch.equal(filled_v[mask], plain_v[mask])
