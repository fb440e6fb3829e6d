"""OWL: layer sparsities from outlier ratios, the model's total kept, on both modifiers."""

import copy

import pytest
import torch
from datasets import Dataset
from pydantic import ValidationError

from compressor import oneshot
from compressor.modifiers import SparseGPTModifier, WandaPruningModifier
from compressor.modifiers.pruning.owl import outlier_ratio, owl_layer_sparsities

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [torch.tensor([1.0, 1.0, 1.0, 9.0]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])]
    # mean 2: with m = 4, only the 9 is an outlier (1 of 8)
    assert outlier_ratio(scores, 4) == pytest.approx(1 / 8)
    assert outlier_ratio(scores, 0.4) == 1.0


def test_more_outliers_get_less_sparsity_and_the_total_stays():
    ratios, sizes = [0.01, 0.05, 0.03], [100, 300, 200]
    sparsities = owl_layer_sparsities(ratios, sizes, 0.5, 0.08)
    assert sparsities[1] < sparsities[2] < sparsities[0]  # more outliers, fewer pruned
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)  # 2 * lambda
    total = sum(s * n for s, n in zip(sparsities, sizes, strict=True)) / sum(sizes)
    assert total == pytest.approx(0.5)
    # equal sizes: OWL's own formula, 1 - (D - mean(D) + (1 - s))
    equal = owl_layer_sparsities(ratios, [1, 1, 1], 0.5, 0.08)
    scaled = [(r - 0.01) / 0.04 * 0.16 for r in ratios]
    expected = [1 - (d - sum(scaled) / 3 + 0.5) for d in scaled]
    assert equal == pytest.approx(expected)
    with pytest.raises(ValueError, match="smaller owl_lmbda"):
        owl_layer_sparsities(ratios, sizes, 0.9, 0.2)


def random_data(count=8, length=32):
    gen = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"input_ids": torch.randint(0, 128, (count, length), generator=gen)})


@pytest.mark.parametrize("modifier", [SparseGPTModifier, WandaPruningModifier])
def test_owl_keeps_the_models_total_sparsity_with_layers_apart(tiny_llama, modifier):
    with torch.no_grad():  # give the second layer strong outliers, so OWL spares it
        tiny_llama.model.layers[1].mlp.down_proj.weight[:, :4] *= 40
    owl = modifier(
        sparsity=0.6,
        sparsity_profile="owl",
        owl_m=5,
        owl_lmbda=0.1,
        targets=["re:model.layers.\\d+$"],
    )
    model = oneshot(tiny_llama, [owl], random_data())
    zeros, total, per_layer = 0, 0, {}
    for name, module in model.named_modules():
        if name.endswith(LINEARS):
            layer = int(name.split(".")[2])
            per_layer.setdefault(layer, []).append(module.weight)
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    # Wanda prunes a whole number per row (32 or 64 inputs here): up to 1/32 off per layer
    assert zeros / total == pytest.approx(0.6, abs=0.01)
    fractions = [
        sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
        for ws in per_layer.values()
    ]
    assert fractions[0] == pytest.approx(0.7, abs=1 / 32)
    assert fractions[1] == pytest.approx(0.5, abs=1 / 32)


def owl_model(tiny_llama):
    with torch.no_grad():  # outliers in the second layer's inputs to down_proj
        tiny_llama.model.layers[1].mlp.down_proj.weight[:, :4] *= 40
    return tiny_llama


def test_owl_sparsities_come_from_a_dense_pass(tiny_llama):
    model = owl_model(tiny_llama)
    dense = copy.deepcopy(model)
    data = random_data()
    owl = SparseGPTModifier(
        sparsity=0.6,
        sparsity_profile="owl",
        owl_m=5,
        owl_lmbda=0.1,
        targets=["re:model.layers.\\d+$"],
    )
    oneshot(model, [owl], data)
    # by hand: every row through the dense model, each Linear's input norms, OWL's formula
    sums = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: sums.__setitem__(
                name, sums.get(name, 0) + args[0].reshape(-1, args[0].shape[-1]).square().sum(0)
            )
        )
        for name, module in dense.named_modules()
        if name.endswith(LINEARS)
    ]
    with torch.no_grad():
        dense(input_ids=torch.tensor(data["input_ids"]))
    for hook in hooks:
        hook.remove()
    ratios, sizes = [], []
    for index in range(len(dense.model.layers)):
        prefix = f"model.layers.{index}."
        linears = [
            (n, m) for n, m in dense.named_modules() if n.startswith(prefix) and n.endswith(LINEARS)
        ]
        ratios.append(outlier_ratio([m.weight.abs() * sums[n].sqrt() for n, m in linears], 5))
        sizes.append(sum(m.weight.numel() for _, m in linears))
    expected = owl_layer_sparsities(ratios, sizes, 0.6, 0.1)
    assert expected[0] > expected[1]  # the outliers do move the sparsities
    chosen = {t.layer: t.sparsity for t in owl._modules.values()}
    assert [chosen[f"model.layers.{i}"] for i in range(2)] == pytest.approx(expected)


def test_owl_prunes_layer_by_layer_on_the_pruned_outputs(tiny_llama):
    """OWL's run equals a run with its layer sparsities given as a list, whose layers are
    calibrated one at a time on the outputs of the pruned layers before them."""
    model = owl_model(tiny_llama)
    listed = copy.deepcopy(model)
    targets = ["re:model.layers.\\d+$"]
    owl = SparseGPTModifier(
        sparsity=0.6, sparsity_profile="owl", owl_m=5, owl_lmbda=0.1, targets=targets
    )
    oneshot(model, [owl], random_data())
    layers = [owl._modules[f"model.layers.{i}.mlp.down_proj"].sparsity for i in range(2)]
    assert layers[0] != pytest.approx(layers[1])
    oneshot(listed, [SparseGPTModifier(sparsity=layers, targets=targets)], random_data())
    for (name, ours), theirs in zip(model.named_parameters(), listed.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, msg=name)


def test_owl_fields_are_all_or_none():
    with pytest.raises(ValidationError, match="owl_m and owl_lmbda"):
        SparseGPTModifier(sparsity=0.5, sparsity_profile="owl")
    with pytest.raises(ValidationError, match="'owl' or unset"):
        WandaPruningModifier(sparsity=0.5, sparsity_profile="flat", owl_m=5, owl_lmbda=0.1)
    with pytest.raises(ValidationError, match="unstructured"):
        SparseGPTModifier(mask_structure="2:4", sparsity_profile="owl", owl_m=5, owl_lmbda=0.1)
