"""AWQ's weight clipping search: the pure search on Gram matrices, and AWQModifier's
``apply_clip`` on a tiny Llama (every linear of the searched modules clipped, none worse)."""

import re

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from smoothing_helpers import captured_logs, random_ids, tiny_llama

from compressor import Recipe, oneshot
from compressor.modifiers import AWQModifier, QuantizationModifier
from compressor.modifiers.quantization.fake_quant import fake_quantize_weight
from compressor.modifiers.transform.awq.clip import (
    CLIP_SHRINKS,
    clip_problem,
    clip_weight,
    clipped_output_errors,
)
from compressor.modifiers.transform.awq.clipping import WeightClipping

CHANNEL = QuantizationArgs(num_bits=4, strategy="channel", symmetric=False)
GROUP = QuantizationArgs(num_bits=3, strategy="group", group_size=8, symmetric=True)


def heavy_tailed(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights with a few large entries (which clipping trades off) and inputs whose columns
    differ in scale, as a layer's calibration inputs do."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=gen)
    outliers = (torch.rand(rows, columns, generator=gen) < 0.03) * 6
    weight += outliers * torch.randn(rows, columns, generator=gen)
    inputs = torch.randn(256, columns, generator=gen) * (torch.rand(columns, generator=gen) * 3)
    return weight, inputs


def test_the_gram_errors_are_the_output_errors_of_each_chunk():
    weight, inputs = heavy_tailed(6, 32, 0)
    delta = fake_quantize_weight(weight, CHANNEL) - weight
    gram = inputs.T @ inputs
    per_row = (inputs @ delta.T).pow(2).sum(dim=0)
    torch.testing.assert_close(clipped_output_errors(delta, gram, 32).squeeze(1), per_row)
    per_group = torch.stack(
        [(inputs[:, g * 8 : (g + 1) * 8] @ delta[:, g * 8 : (g + 1) * 8].T).pow(2).sum(0)
         for g in range(4)], dim=1)  # fmt: skip
    torch.testing.assert_close(clipped_output_errors(delta, gram, 8), per_group)


@pytest.mark.parametrize("args", [CHANNEL, GROUP], ids=["channel-asym", "group-sym"])
def test_clipping_shrinks_each_range_by_a_searched_factor_and_loses_less(args):
    weight, inputs = heavy_tailed(16, 64, 1)
    gram = inputs.T @ inputs
    clipped, before, after = clip_weight(weight, gram, args, "w")
    assert after < before  # the heavy tails are worth clipping
    chunk = 64 if args.strategy == "channel" else 8
    for old, new in zip(weight.split(chunk, dim=1), clipped.split(chunk, dim=1), strict=True):
        for o, n in zip(old, new, strict=True):  # one row of one chunk
            # the side away from zero shows the factor (a chunk may lie on one side of zero)
            factor = n.max() / o.max() if o.max() > 0 else n.min() / o.min()
            assert min(abs(factor - f) for f in CLIP_SHRINKS) < 1e-5
            torch.testing.assert_close(n, o.clamp(o.min() * factor, o.max() * factor))
    # and the output error it reports is the one of the clipped weights, quantized
    unclipped = clipped_output_errors(fake_quantize_weight(weight, args) - weight, gram, chunk)
    errors = clipped_output_errors(fake_quantize_weight(clipped, args) - weight, gram, chunk)
    assert (errors <= unclipped + 1e-3).all()
    assert after == pytest.approx(float(errors.sum()), rel=1e-4)
    assert before == pytest.approx(float(unclipped.sum()), rel=1e-4)


def test_schemes_clipping_does_not_search_are_named():
    assert "float" in clip_problem(QuantizationArgs(num_bits=8, type="float"))
    assert "tensor" in clip_problem(QuantizationArgs(num_bits=4, strategy="tensor"))
    assert clip_problem(CHANNEL) is None
    with pytest.raises(ValueError, match=r"w: cannot clip .*tensor"):
        clip_weight(torch.ones(2, 4), torch.eye(4), QuantizationArgs(strategy="tensor"), "w")
    with pytest.raises(ValueError, match=r"w: Gram matrix \(3, 3\) does not match .* 4 columns"):
        clip_weight(torch.ones(2, 4), torch.eye(3), CHANNEL, "w")


def test_a_folded_scale_divides_the_gram_as_it_divides_the_inputs():
    _, inputs = heavy_tailed(1, 12, 2)
    scales = torch.rand(12) + 0.5
    clipping = WeightClipping([])
    clipping.add("m", inputs)
    clipping.rescale("m", scales)
    divided = inputs / scales
    torch.testing.assert_close(clipping.grams["m"], divided.T @ divided, rtol=1e-5, atol=1e-4)


def test_apply_clip_clips_every_linear_of_the_searched_modules_no_worse():
    model = tiny_llama()  # grouped-query: o_proj is clipped on its own inputs
    unclipped = tiny_llama()
    groups = {"g": {"targets": ["Linear"], "weights": CHANNEL.model_dump()}}
    with captured_logs("DEBUG") as lines:
        oneshot(
            model,
            [
                AWQModifier(n_grid=6, apply_clip=True),
                QuantizationModifier(config_groups=groups, ignore=["lm_head"]),
            ],
            random_ids(),
        )
    oneshot(
        unclipped,
        [AWQModifier(n_grid=6), QuantizationModifier(config_groups=groups, ignore=["lm_head"])],
        random_ids(),
    )
    pattern = re.compile(r"AWQ clip (\S+): output error ([0-9.e+-]+) unclipped, ([0-9.e+-]+)")
    found = {m.group(1): (float(m.group(2)), float(m.group(3))) for m in map(pattern.search, lines)
             if m}  # fmt: skip
    layers = model.config.num_hidden_layers
    projections = ("q", "k", "v", "o", "gate", "up", "down")
    assert len(found) == layers * len(projections)
    assert all(after <= before for before, after in found.values())
    assert any(after < before for before, after in found.values())
    # the first layer (same inputs, same scales on both sides): clipped within its ranges
    theirs = dict(unclipped.named_modules())
    first = [n for n in found if n.startswith("model.layers.0.") and found[n][1] < found[n][0]]
    assert first
    for name in first:
        mine, other = model.get_submodule(name).weight, theirs[name].weight
        assert not torch.equal(mine, other)
        assert (mine.amax(dim=1) <= other.amax(dim=1) + 1e-6).all()
        assert (mine.amin(dim=1) >= other.amin(dim=1) - 1e-6).all()


def test_apply_clip_round_trips_in_a_recipe():
    recipe = Recipe.from_yaml(
        "quant_stage:\n  quant_modifiers:\n    AWQModifier: {apply_clip: true}\n"
    )
    assert recipe.modifiers[0].apply_clip is True
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert AWQModifier().apply_clip is False  # llm-compressor 0.14's AWQ does not clip
