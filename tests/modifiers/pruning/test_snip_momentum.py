"""``method: snip_momentum``: DeepSpeed's sparse pruner, checked against its rule.

DeepSpeed 0.19.6 hands ``snip_momentum`` to Intel Neural Compressor's PyTorch pruner
(``WeightPruningConfig(target_sparsity=1 - dense_ratio, pattern=block_pattern,
pruning_frequency=schedule_offset_stride, start_step=schedule_offset,
end_step=schedule_offset_end, excluded_op_names=excluded_modules)``, every other setting at its
default: snip_momentum criterion, global scope, exp decay, 98% cap per layer). ``Reference``
below writes that pruner's rule down from neural-compressor 3.7.1's code, step by step and
with full-size masks as it keeps them, independently of ``snip.py``.
"""

from __future__ import annotations

import pytest
import torch
from pruning_helpers import train
from transformers import LlamaForCausalLM

from compressor import CompressionSession
from compressor.modifiers.pruning import RowPruningModifier, SparsePruningModifier
from compressor.modifiers.pruning.snip import (
    PruneSchedule,
    block_scores,
    from_matrix,
    global_block_masks,
    momentum_update,
    parse_block_pattern,
    snip_layers,
    to_matrix,
)
from conftest import tiny_llama_config


# ---------------------------------------------------------------- the reference
def _reduced(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """A full mask reduced to blocks: a block counts as pruned when all its entries are 0."""
    o, i = mask.shape
    n, m = block
    return mask.float().reshape(o // n, n, i // m, m).sum(-1).sum(1) != 0


def _info(mask, block):
    reduced = _reduced(mask, block)
    zero = int((reduced == 0).sum())
    return zero, reduced.numel(), zero / reduced.numel()


def _full(block_mask, block):
    return block_mask.repeat_interleave(block[0], 0).repeat_interleave(block[1], -1)


def _adjust(masks, key, new, block, final_target, max_ratio=0.98, min_ratio=0.0):
    """The pattern's adjust_ratio: cap a layer at ``max_ratio``; once any layer is past the
    final target, keep the model-wide pruned count within it."""
    need = False
    zero, total, ratio = new
    if ratio > max_ratio:
        need, ratio, zero = True, max_ratio, int(total * max_ratio)
    if ratio < min_ratio:
        return need, ratio
    infos = {k: _info(m, block) for k, m in masks.items()}
    exceed = any(r > final_target for _, _, r in infos.values()) or ratio > final_target
    if not exceed:
        return need, ratio
    zero_below = total_below = zero_above = 0
    for k, (z, t, r) in infos.items():
        if k == key:
            z, t, r = zero, total, ratio
        if r < min_ratio:
            zero_below += z
            total_below += t
        else:
            zero_above += z
    gap = int(total_below * min_ratio) - zero_below
    net_total = sum(t for _, t, _ in infos.values())
    remaining = int(net_total * final_target) - zero_above - zero_below
    if remaining >= gap:
        return need, ratio
    return True, (zero - (gap - remaining)) / total


def reference_masks(scores, masks, ratio, block, final_target):
    """The NxM pattern's global masks: one kthvalue threshold over all layers' block scores,
    re-taken without the capped layers until none is newly capped."""
    masks = dict(masks)
    keep: dict[str, bool] = {}
    total = sum(_info(m, block)[1] for m in masks.values())
    residual = int(total * ratio)
    if residual <= 0:
        return masks
    not_exceed: list[str] = []
    while True:
        new = [k for k in scores if not keep.get(k, False)]
        if not_exceed == new or not new:
            break
        not_exceed = new
        pool = torch.cat([scores[k].flatten() for k in not_exceed])
        if residual < 1:
            break
        threshold, _ = torch.kthvalue(pool, residual)
        for k in not_exceed:
            mask = _full(scores[k] > threshold, block)
            need, adjusted = _adjust(masks, k, _info(mask, block), block, final_target)
            if need:
                keep[k] = True
                flat = scores[k].flatten()
                kk = int(adjusted * flat.numel())
                if kk >= 1:
                    th, _ = torch.kthvalue(flat, kk)
                    block_mask = scores[k] > th
                else:
                    block_mask = torch.ones_like(scores[k], dtype=torch.bool)
                masks[k] = _full(block_mask, block)
                residual -= _info(masks[k], block)[0]
            else:
                masks[k] = mask
    return masks


class Reference:
    """The pruner's state machine: scores before each optimizer step, masks at the first
    forward of a pruning step (once per step), ``global_step`` counted after each step."""

    def __init__(self, layers, block, target, start, end, stride):
        self.layers, self.block, self.target = layers, block, target
        self.start, self.end, self.stride = start, end, stride
        self.scores = {
            k: torch.zeros(w.shape[0] // block[0], w.shape[1] // block[1])
            for k, w in layers.items()
        }
        self.masks = {k: torch.ones(w.shape, dtype=torch.bool) for k, w in layers.items()}
        self.total = (end - start + stride) // stride - 1
        self.completed = 0
        if self.total == 0:
            self.total, self.completed = 1, 1
        self.global_step, self.handled, self.current = 0, -1, 0.0

    def ratio(self):
        """The scheduler's sparsity for the pruning step ``completed`` (exp decay)."""
        if self.start == self.end:
            return self.target
        aggressive = min(0.98, self.target)
        per_step = (1.0 - aggressive) ** (1 / self.total)
        return min(self.target, 1.0 - per_step**self.completed)

    def before_optimizer_step(self):
        for k, w in self.layers.items():
            saliency = (w.detach() * w.grad).abs()
            o, i = saliency.shape
            n, m = self.block
            reduced = saliency.reshape(o // n, n, i // m, m).mean(-1).mean(1)
            self.scores[k] = self.scores[k] * 0.9 + 1.0 * reduced

    def after_optimizer_step(self):
        self.global_step += 1

    def step_begin(self):
        if self.handled == self.global_step:
            return
        self._update()
        self.handled = self.global_step

    def _update(self):
        g = self.global_step
        if g < self.start or g > self.end or (g - self.start) % self.stride:
            return
        if self.current > self.target:
            return
        ratio = self.ratio()
        self.completed += 1
        self.masks = reference_masks(self.scores, self.masks, ratio, self.block, self.target)
        zero = sum(_info(m, self.block)[0] for m in self.masks.values())
        self.current = zero / sum(_info(m, self.block)[1] for m in self.masks.values())


# ---------------------------------------------------------------- pure functions
def test_global_masks_equal_the_reference_with_capped_layers():
    gen = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.rand(8, 16, generator=gen),
        "b": torch.rand(4, 16, generator=gen) * 1e-3,  # would be pruned entirely: capped
        "c": torch.rand(16, 8, generator=gen),
    }
    block = (4, 1)
    full = {
        "a": torch.ones(32, 16, dtype=torch.bool),
        "b": torch.ones(16, 16, dtype=torch.bool),
        "c": torch.ones(64, 8, dtype=torch.bool),
    }
    for ratio, final in ((0.3, 0.6), (0.6, 0.6), (0.9, 0.9)):
        expected = reference_masks(scores, full, ratio, block, final)
        ours = global_block_masks(
            list(scores.values()), [_reduced(m, block) for m in full.values()], ratio, final
        )
        for (key, want), got in zip(expected.items(), ours, strict=True):
            assert torch.equal(_full(got, block), want), (ratio, key)
        assert (~ours[1]).float().mean().item() <= 0.98  # "b" is capped, not emptied


def test_global_masks_follow_the_reference_when_blocks_come_back():
    gen = torch.Generator().manual_seed(1)
    block = (2, 2)
    scores = {"x": torch.rand(6, 4, generator=gen), "y": torch.rand(3, 8, generator=gen)}
    masks = {"x": torch.ones(12, 8, dtype=torch.bool), "y": torch.ones(6, 16, dtype=torch.bool)}
    masks = reference_masks(scores, masks, 0.5, block, 0.8)
    ours = [_reduced(m, block) for m in masks.values()]
    # scores change: some pruned blocks now outscore kept ones
    scores = {k: torch.rand(v.shape, generator=gen) for k, v in scores.items()}
    masks = reference_masks(scores, masks, 0.7, block, 0.8)
    ours = global_block_masks(list(scores.values()), ours, 0.7, 0.8)
    assert all(torch.equal(_full(o, block), m) for o, m in zip(ours, masks.values(), strict=True))


def test_global_masks_hold_the_final_target_when_a_layer_was_pruned_past_it():
    # y is visited first while x still carries an earlier mask far past the final target:
    # the model-wide count is then kept within the final target by pruning y less
    gen = torch.Generator().manual_seed(3)
    block = (1, 1)
    low, high = torch.rand(10, 10, generator=gen) * 0.1, torch.rand(10, 10, generator=gen) + 1
    first = {"y": high, "x": low}
    masks = {"y": torch.ones(10, 10, dtype=torch.bool), "x": torch.ones(10, 10, dtype=torch.bool)}
    masks = reference_masks(first, masks, 0.45, block, 0.5)
    assert _info(masks["x"], block)[2] == 0.9
    second = {"y": low.flip(0), "x": high.flip(1)}
    expected = reference_masks(second, masks, 0.5, block, 0.5)
    ours = global_block_masks(list(second.values()), list(masks.values()), 0.5, 0.5)
    assert _info(expected["y"], block)[2] < 0.5  # held back, not capped at 0.98
    assert all(torch.equal(o, m) for o, m in zip(ours, expected.values(), strict=True))


def test_momentum_and_block_means_match_the_reference_on_a_conv():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 3, 2, 2, generator=gen)
    grad = torch.randn(8, 3, 2, 2, generator=gen)
    matrix = to_matrix(weight)
    assert matrix.shape == (8, 12)
    assert torch.equal(from_matrix(matrix, weight.shape), weight)
    # kernel positions first, then channels: column 1 is channel 1 at kernel position (0, 0)
    assert torch.equal(matrix[:, 1], weight[:, 1, 0, 0])
    before = torch.rand(2, 12, generator=gen)
    saliency = (weight * grad).abs().permute(0, 2, 3, 1).reshape(8, 12)
    expected = before * 0.9 + saliency.reshape(2, 4, 12, 1).mean(-1).mean(1)
    assert torch.allclose(momentum_update(before, weight, grad, (4, 1)), expected)
    assert block_scores(torch.ones(8, 12), (4, 3)).shape == (2, 4)


@pytest.mark.parametrize(
    ("start", "end", "stride", "expected"),
    [
        (2, 8, 2, [2, 4, 6, 8]),  # 0 at step 2, the target at step 8
        (0, 5, 2, [0, 2, 4]),  # the last pruning step before end reaches the target
        (3, 3, 1, [3]),  # one step
        (1, 2, 5, [1]),  # end before the second step: the first reaches the target
    ],
)
def test_schedule_matches_the_reference(start, end, stride, expected):
    schedule = PruneSchedule(start, end, stride, 0.75)
    steps = [s for s in range(12) if schedule.is_pruning_step(s)]
    assert steps == expected
    reference = Reference({}, (1, 1), 0.75, start, end, stride)
    done = schedule.first_done
    for _ in steps:
        assert schedule.sparsity(done) == pytest.approx(reference.ratio())
        reference.completed += 1
        done += 1
    assert schedule.sparsity(done - 1) == pytest.approx(0.75)


@pytest.mark.parametrize("value", ["2:4", "4x", "x1", "0x4", "mha", "4*1", "channelxchannel", ""])
def test_unknown_block_patterns_are_refused_naming_the_allowed_forms(value):
    with pytest.raises(ValueError, match="block_pattern must be 'NxM'.*'channelxM' or 'Nxchannel'"):
        parse_block_pattern(value)


def test_channel_patterns_span_a_whole_dimension():
    assert parse_block_pattern("channelx1").shape_for((12, 8)) == (12, 1)
    assert parse_block_pattern("1xchannel").shape_for((12, 8)) == (1, 8)
    with pytest.raises(ValueError, match="block_pattern 3x1: layer.q has a 32x32 weight"):
        parse_block_pattern("3x1").check((32, 32), "layer.q")


# ---------------------------------------------------------------- the modifier
def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, 16), generator=gen)} for _ in range(n)]


def test_training_matches_the_reference_at_every_pruning_step():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    modifier = SparsePruningModifier(
        method="snip_momentum", density=0.3, block_pattern="4x1", start=2, end=8, update=2
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    session = CompressionSession()
    session.initialize(model=model, recipe=[modifier], optimizer=opt)
    layers = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "lm_head" not in {c.name for c in modifier._couplings}  # the head is left out
    layers.pop("lm_head")
    reference = Reference(layers, (4, 1), 0.7, start=2, end=8, stride=2)
    opt.register_step_pre_hook(lambda *_: reference.before_optimizer_step())
    opt.register_step_post_hook(lambda *_: reference.after_optimizer_step())
    compared = []

    def check_masks():
        reference.step_begin()
        scorer = modifier.scorer
        for index, (name, weight) in enumerate(layers.items()):
            held = _full(scorer.block_masks[index], (4, 1))
            assert torch.equal(held, reference.masks[name]), (reference.global_step, name)
            assert (weight[~held] == 0).all()
        compared.append(reference.global_step)

    model.train()
    for batch in _batches(11):
        session.batch_start(batch_data=batch)
        check_masks()
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        session.loss_calculated(out.loss).backward()
        opt.step()
        opt.zero_grad()
        session.batch_end()
    session.finalize()
    assert compared == list(range(11))
    pruned = sum(int((~_reduced(m, (4, 1))).sum()) for m in reference.masks.values())
    blocks = sum(w.numel() // 4 for w in layers.values())
    assert pruned == int(blocks * 0.7)  # DeepSpeed's final count of pruned blocks
    for weight in layers.values():  # whole 4x1 blocks (4 outputs of one input) are zero
        zero_blocks = (weight == 0).reshape(weight.shape[0] // 4, 4, -1).all(dim=1)
        any_zero = (weight == 0).reshape(weight.shape[0] // 4, 4, -1).any(dim=1)
        assert torch.equal(zero_blocks, any_zero)
    assert (model.lm_head.weight != 0).all()


def test_gradients_of_pruned_weights_are_left_alone_and_the_weights_rezeroed():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    modifier = SparsePruningModifier(method="snip_momentum", density=0.5, start=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    session = CompressionSession()
    session.initialize(model=model, recipe=[modifier], optimizer=opt)
    seen = []

    def after_step():
        weight = model.model.layers[0].mlp.up_proj.weight
        seen.append((weight == 0).float().mean().item())

    batches = _batches(3)
    train(model, session, opt, batches[:2], after_step=after_step)
    weight = model.model.layers[0].mlp.up_proj.weight
    pruned = weight == 0
    session.batch_start()
    model(input_ids=batches[2]["input_ids"], labels=batches[2]["input_ids"]).loss.backward()
    assert pruned.any() and (weight.grad[pruned] != 0).any()  # as DeepSpeed: not masked
    opt.step()
    assert (weight[pruned] == 0).all()  # zeroed again after the step
    opt.zero_grad()
    session.batch_end()
    session.finalize()


def test_a_run_without_optimizer_steps_is_refused_at_its_pruning_step():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    session = CompressionSession()
    modifier = SparsePruningModifier(method="snip_momentum", density=0.5, start=0)
    session.initialize(model=model, recipe=[modifier])
    with pytest.raises(RuntimeError, match="has seen no optimizer step"):
        session.batch_start()


def test_a_pattern_that_does_not_tile_a_weight_fails_at_initialize_naming_it():
    model = LlamaForCausalLM(tiny_llama_config())  # k_proj: 16 x 32
    modifier = SparsePruningModifier(
        method="snip_momentum", density=0.5, start=0, end=4, block_pattern="32x1"
    )
    with pytest.raises(ValueError, match=r"block_pattern 32x1: model.layers.0.self_attn.k_proj"):
        CompressionSession().initialize(model=model, recipe=[modifier])


def test_deepspeed_layer_choice_leaves_out_the_head_and_takes_linear_named_classes():
    model = LlamaForCausalLM(tiny_llama_config())
    layers, head = snip_layers(model)
    assert head == "lm_head"
    assert [n for n, _ in layers] == [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    modifier = SparsePruningModifier(
        method="snip_momentum", density=0.5, start=0, end=2, ignore=["re:.*mlp"]
    )
    CompressionSession().initialize(model=model, recipe=[modifier])
    assert all("mlp" not in c.name for c in modifier._couplings)
    assert len(modifier._couplings) == 8


@pytest.mark.parametrize(
    ("kind", "args", "message"),
    [
        (SparsePruningModifier, {"density": 0.5, "block_pattern": "4x1"}, "read only with method"),
        (
            RowPruningModifier,
            {"method": "snip_momentum", "density": 0.5, "start": 0},
            "takes method",
        ),
        (SparsePruningModifier, {"method": "snip_momentum", "density": 0.5}, "whole number"),
        (
            SparsePruningModifier,
            {"method": "snip_momentum", "density": 0.5, "start": 0, "init_density": 0.9},
            "own exponential schedule",
        ),
        (
            SparsePruningModifier,
            {"method": "snip_momentum", "density": 0.5, "start": 0, "block_pattern": "2:4"},
            "block_pattern must be",
        ),
    ],
)
def test_bad_snip_arguments_fail_at_parse_time(kind, args, message):
    with pytest.raises(ValueError, match=message):
        kind(**args)


def _snip_run(model, opt, start_step=None):
    modifier = SparsePruningModifier(
        method="snip_momentum", density=0.3, block_pattern="4x1", start=2, end=8, update=2
    )
    session = CompressionSession()
    session.initialize(model=model, recipe=[modifier], optimizer=opt, start=start_step)
    return session, modifier


def test_a_resumed_run_prunes_as_the_uninterrupted_one():
    import copy

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    session, modifier = _snip_run(model, opt)
    batches = _batches(11, seed=4)
    train(model, session, opt, batches[:5])  # pruned at steps 2 and 4
    saved = copy.deepcopy(session.state_dict())
    resumed_model = copy.deepcopy(model)
    resumed_opt = torch.optim.SGD(resumed_model.parameters(), lr=0.05)
    resumed_opt.load_state_dict(opt.state_dict())
    train(model, session, opt, batches[5:])
    session.finalize()

    resumed, restored = _snip_run(resumed_model, resumed_opt, start_step=5)
    resumed.load_state_dict(saved)
    assert restored.scorer.done == modifier.scorer.done - 2  # steps 6 and 8 still to come
    train(resumed_model, resumed, resumed_opt, batches[5:])
    resumed.finalize()
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a == 0, b == 0), name
    assert torch.equal(
        torch.cat([m.flatten() for m in modifier.scorer.block_masks]),
        torch.cat([m.flatten() for m in restored.scorer.block_masks]),
    )


def test_snip_momentum_prunes_the_latent_weights_under_quantization_aware_training():
    """DeepSpeed configs may enable weight quantization beside snip_momentum: the scores take
    the latent Parameter's gradient (``module.weight`` under QAT is recomputed on every read and
    has none), and its whole 4x1 blocks are pruned to the target."""
    from torch.nn.utils import parametrize

    from compressor.modifiers import QuantizationModifier

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    snip = SparsePruningModifier(
        method="snip_momentum", density=0.3, block_pattern="4x1", start=2, end=6, update=2
    )
    qat = QuantizationModifier(
        config_groups={"g": {"targets": ["re:.*_proj$"], "weights": weights}}, start=0
    )
    session = CompressionSession()
    session.initialize(model=model, recipe=[snip, qat], optimizer=opt)
    train(model, session, opt, _batches(8, seed=2))
    latent = {
        c.name: c.members[0].module.parametrizations.weight.original
        for c in snip._couplings
        if parametrize.is_parametrized(c.members[0].module, "weight")
    }
    assert len(latent) == len(snip._couplings)  # every pruned layer was quantization-aware
    pruned = sum(
        int((w == 0).reshape(w.shape[0] // 4, 4, -1).all(dim=1).sum()) for w in latent.values()
    )
    blocks = sum(w.numel() // 4 for w in latent.values())
    assert pruned == int(blocks * 0.7)  # DeepSpeed's final count, on the latent weights
    session.finalize()
