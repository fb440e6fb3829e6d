import pytest
import torch
from torch.nn.utils import parametrize

from compressor.modifiers.hooks import HooksMixin
from compressor.modifiers.pruning.masks import (
    MaskHolder,
    ScoreMask,
    add_score_mask,
    expand_unit_mask,
)
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
    columns = expand_unit_mask(torch.tensor([False, True, True]), torch.Size([2, 6]), 1)
    assert columns.shape == (1, 6)
    assert columns.view(-1).tolist() == [False, False, True, True, True, True]
    with pytest.raises(ValueError, match="3 units do not divide a dimension of size 4"):
        expand_unit_mask(torch.tensor([True, False, True]), torch.Size([4, 3]), 0)


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


def test_a_score_mask_keeps_every_weight_until_the_schedule_sets_how_many():
    """A fresh ScoreMask (per entry, or per unit) is the identity: the model computes what it
    did until the schedule's first step sets how many scores to keep."""
    torch.manual_seed(0)
    weight = torch.randn(4, 6)
    per_entry = ScoreMask(torch.nn.Parameter(torch.rand(4, 6)), None)
    per_row = ScoreMask(torch.nn.Parameter(torch.rand(2)), 0)
    assert torch.equal(per_entry(weight), weight) and torch.equal(per_row(weight), weight)
    per_row.keep = 1  # the higher-scored unit of 2 rows
    kept_unit = int(per_row.scores.argmax())
    expected = torch.zeros_like(weight)
    expected[2 * kept_unit : 2 * kept_unit + 2] = weight[2 * kept_unit : 2 * kept_unit + 2]
    assert torch.equal(per_row(weight), expected)


def test_removing_a_score_mask_keeps_the_masked_weight_in_the_same_parameter():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    original = layer.weight
    before = layer.weight.detach().clone()
    scores = torch.nn.Parameter(torch.rand(4, 6))
    score_mask = ScoreMask(scores, None)
    handle = add_score_mask(layer, "weight", score_mask, "layer")
    score_mask.keep = 10
    kept = topk_mask(scores, 10)
    handle.remove()
    assert not parametrize.is_parametrized(layer)
    assert layer.weight is original  # the optimizer's reference still holds
    assert torch.equal(layer.weight.detach(), before * kept)  # not the unmasked weight
    handle.remove()  # a second removal (the modifier's hooks, then the scorer's) is a no-op


def test_mask_holder_hooks_each_trainable_parameter_once_and_masks_frozen_ones_now():
    owner = HooksMixin()
    holder = MaskHolder(owner)
    frozen, trained = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    frozen.weight.requires_grad_(False)
    first, second = torch.rand(4, 4) > 0.5, torch.rand(4, 4) > 0.3
    holder.set(frozen.weight, first)  # nothing to hook: no gradient ever reaches it
    assert owner.num_hooks == 0 and (frozen.weight[~first] == 0).all()
    holder.set(trained.weight, first)
    assert (trained.weight[~first] == 0).all()  # zeroed at once, not only after a step
    holder.set(trained.weight, first & second)  # a later, sparser mask on the same tensor
    assert owner.num_hooks == 1 and len(holder) == 2
    assert torch.equal(holder.mask_of(trained.weight), first & second)
    trained(torch.randn(3, 4)).pow(2).sum().backward()
    assert (trained.weight.grad[~(first & second)] == 0).all()
    assert (trained.weight.grad[first & second] != 0).any()


def test_mask_holder_reapplies_masks_set_after_a_reapply_and_forgets_cleared_ones():
    holder = MaskHolder(HooksMixin())
    holder.reapply()  # nothing held: nothing to do
    a, b, c = (torch.nn.Linear(4, 4) for _ in range(3))
    mask = torch.rand(4, 4) > 0.5
    holder.set(a.weight, mask)
    holder.reapply()
    holder.set(b.weight, mask)  # after the first reapply
    with torch.no_grad():
        a.weight.fill_(1.0)
        b.weight.fill_(1.0)
    holder.reapply()
    assert (a.weight[~mask] == 0).all() and (b.weight[~mask] == 0).all()
    holder.clear()
    assert len(holder) == 0 and holder.mask_of(a.weight) is None
    holder.set(c.weight, mask)
    with torch.no_grad():
        a.weight.fill_(1.0)
        c.weight.fill_(1.0)
    holder.reapply()
    assert (a.weight == 1).all()  # cleared: free to train again
    assert (c.weight[~mask] == 0).all()


def test_a_sparser_mask_fills_the_newly_pruned_second_moments():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    holder = MaskHolder(HooksMixin())
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    first = torch.rand(8, 8) > 0.3
    second = first & (torch.rand(8, 8) > 0.5)
    for mask in (first, second):
        holder.set(layer.weight, mask)
        layer(torch.randn(3, 8)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        holder.reapply(opt)
        moments = opt.state[layer.weight]["exp_avg_sq"]
        assert (moments[~mask] == 1).all()


def test_topk_mask_keeps_exactly_k_and_refuses_k_outside_one_to_all():
    scores = torch.randn(3, 4)
    assert topk_mask(scores, 12).all()  # density 1 keeps everything
    kept = topk_mask(scores, 3)
    assert kept.sum() == 3 and scores[kept].min() > scores[~kept].max()
    for k in (0, 13):
        with pytest.raises(ValueError, match=rf"k must be in \[1, 12\], got {k}"):
            topk_mask(scores, k)


def test_nm_mask_groups_each_rows_consecutive_inputs():
    torch.manual_seed(0)
    scores = torch.randn(3, 2, 4)  # (out, in, kernel): the input dimension flattened
    mask = nm_mask(scores, 2, 4)
    for row, row_mask in zip(scores.reshape(3, -1), mask.reshape(3, -1), strict=True):
        for run, run_mask in zip(row.split(4), row_mask.split(4), strict=True):
            assert run_mask.sum() == 2 and run[run_mask].min() > run[~run_mask].max()
    assert nm_mask(scores, 4, 4).all()
    with pytest.raises(ValueError, match="0 < N <= M, got 0:4"):
        nm_mask(scores, 0, 4)


def test_activation_scores_of_a_wide_linear_and_a_convolution():
    torch.manual_seed(0)
    sums = torch.tensor([4.0, 9.0])
    linear = torch.randn(3, 2)  # signed, and not square
    assert torch.equal(activation_scores(linear, sums), linear.abs() * sums.sqrt())
    conv = torch.randn(3, 2, 3, 3)
    expected = conv.abs() * sums.sqrt().view(1, 2, 1, 1)
    assert torch.equal(activation_scores(conv, sums), expected)
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(2,\)"):
        activation_scores(linear, torch.ones(3))
