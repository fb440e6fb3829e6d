"""NaN or inf weights are refused, naming the weight, before a modifier works on them."""

import pytest
import torch
from datasets import Dataset

from compressor import CompressionSession, oneshot
from compressor.modifiers import (
    GPTQModifier,
    HeadPruningModifier,
    LayerReductionModifier,
    RowPruningModifier,
    SparsePruningModifier,
    SpinQuantModifier,
)
from compressor.utils.finite import check_finite_weights


def test_check_finite_weights_names_the_parameter_and_counts():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    check_finite_weights(net.named_modules(), "Test")  # finite: nothing raised
    with torch.no_grad():
        net[1].weight[0, :2] = torch.tensor([float("nan"), float("inf")])
        net[1].bias[0] = float("-inf")
    with pytest.raises(
        ValueError, match=r"Test: 1.weight holds 1 NaN and 1 infinite value\(s\) of 8"
    ):
        check_finite_weights(net.named_modules(), "Test")
    meta = torch.nn.Linear(4, 4, device="meta")  # not in memory: skipped
    check_finite_weights([("offloaded", meta)], "Test")


GPTQ_GROUPS = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
               "symmetric": True, "strategy": "group", "group_size": 16}}}  # fmt: skip
MODIFIERS = {
    "sparse": lambda: SparsePruningModifier(density=0.5),
    "rows": lambda: RowPruningModifier(density=0.5),
    "heads": lambda: HeadPruningModifier(density=0.5),
    "spinquant": lambda: SpinQuantModifier(rotations=["R1", "R2"]),
    "angular": lambda: LayerReductionModifier(strategy="angular", num_layers_to_drop=1),
    "gptq": lambda: GPTQModifier(config_groups=GPTQ_GROUPS, ignore=["lm_head"]),
}


@pytest.mark.parametrize("kind", sorted(MODIFIERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_refused_at_initialize_with_the_module_named(tiny_llama, kind, bad):
    # a weight the modifier reads (head pruning reads the attention only)
    name = "self_attn.o_proj" if kind == "heads" else "mlp.down_proj"
    with torch.no_grad():
        tiny_llama.model.layers[1].get_submodule(name).weight[3, 5] = bad
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    modifier = MODIFIERS[kind]()
    with pytest.raises(ValueError, match=rf"{type(modifier).__name__}: "
                       rf"model.layers.1.{name}.weight holds"):  # fmt: skip
        CompressionSession().initialize(model=tiny_llama, recipe=[modifier])
    after = tiny_llama.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k].nan_to_num(), after[k].nan_to_num()) for k in before)


def test_gptq_blames_the_weight_not_the_calibration_data(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    rows = Dataset.from_dict({"input_ids": [list(range(16))] * 2})
    with pytest.raises(ValueError, match="q_proj.weight holds 1 NaN") as raised:
        oneshot(tiny_llama, [MODIFIERS["gptq"]()], rows)
    assert "calibration data" not in str(raised.value)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -0.1, 2.0])
def test_gptq_dampening_frac_must_be_finite_and_at_most_one(value):
    from compressor import Recipe
    from compressor.recipe import RecipeError

    text = (
        f"s_stage:\n  g_modifiers:\n    GPTQModifier: {{dampening_frac: {value}, scheme: W4A16}}\n"
    )
    text = text.replace("inf", ".inf").replace("nan", ".nan")
    with pytest.raises(RecipeError, match="GPTQModifier -> dampening_frac"):
        Recipe.from_yaml(text)


def test_a_large_weight_is_checked_a_slice_at_a_time_and_every_slice_is_read(monkeypatch):
    from compressor.utils import finite

    monkeypatch.setattr(finite, "_CHUNK_ELEMENTS", 64)
    seen: list[int] = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or isfinite(t))
    net = torch.nn.Linear(16, 40, bias=False)  # 640 entries: 10 slices of 4 rows
    check_finite_weights(net.named_modules(), "Test")
    assert seen == [64] * 10
    for bad in (float("nan"), float("-inf")):
        with torch.no_grad():
            net.weight[39, 15] = bad  # the last entry of the last slice
        with pytest.raises(ValueError, match=r"Test: weight holds"):
            check_finite_weights(net.named_modules(), "Test")
        with torch.no_grad():
            net.weight[39, 15] = 0.0
    scalar = torch.nn.Module()
    scalar.register_parameter("t", torch.nn.Parameter(torch.tensor(float("nan"))))
    with pytest.raises(ValueError, match=r"Test: t holds 1 NaN"):
        check_finite_weights([("", scalar)], "Test")
