"""DeepSpeed compression configs converted to our modifiers and run on a tiny BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from compressor import CompressionSession
from compressor.entrypoints.cli import main
from compressor.recipe import Recipe
from compressor.recipe.recipe import RecipeError

DATA = Path(__file__).parent / "data"


def _config(name: str) -> dict:
    return json.loads((DATA / f"ds_bert_{name}.json").read_text())


def _bert(layers: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def _train(model: torch.nn.Module, recipe: Recipe, steps: int = 8) -> CompressionSession:
    """A plain loop; without an optimizer at initialize, one batch is one optimizer step, and
    the optimizer is created after initialize (layer reduction and topk change parameters)."""
    model.train()
    session = CompressionSession()
    session.initialize(model=model, recipe=recipe)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 12), generator=gen)
        labels = torch.randint(0, 2, (4,), generator=gen)
        session.batch_start()
        loss = session.loss_calculated(model(input_ids=ids, labels=labels).loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        session.batch_end()
    session.finalize()
    return session


def _roundtrip(recipe: Recipe) -> None:
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def _only(config: dict, technique: str) -> dict:
    return {"compression_training": {technique: config["compression_training"][technique]}}


# ---------------------------------------------------------------- quantization
def test_quantization_config_maps_to_one_modifier_with_weights_and_inputs():
    recipe = Recipe.from_deepspeed(DATA / "ds_bert_quantization.json")
    (modifier,) = recipe.modifiers
    assert type(modifier).__name__ == "QuantizationModifier"
    assert (modifier.start, modifier.rounding) == (2, "nearest")
    assert (modifier.start_bits, modifier.target_bits, modifier.quantization_period) == (8, 4, 2)
    group = modifier.config_groups["wq1"]
    assert group.targets == ["re:.*attention.self", "re:.*intermediate", "re:.*output.dense"]
    assert group.weights.num_bits == 4 and group.weights.symmetric is True
    assert group.weights.strategy == "tensor"
    acts = group.input_activations
    assert (acts.num_bits, acts.symmetric, acts.dynamic) == (8, False, False)
    _roundtrip(recipe)


def test_quantization_runs_on_tiny_bert_and_quantizes_the_weights():
    model = _bert()
    _train(model, Recipe.from_deepspeed(DATA / "ds_bert_quantization.json"))
    layer = model.bert.encoder.layer[0]
    for linear in (layer.attention.self.query, layer.intermediate.dense, layer.output.dense):
        assert hasattr(linear, "weight_scale")
        levels = torch.round(linear.weight / linear.weight_scale).unique()
        assert levels.numel() <= 16  # 4 bits after the progressive schedule
    assert not hasattr(model.classifier, "weight_scale")  # not named by modules
    assert hasattr(layer.attention.self.query, "input_scale")  # static activation range


def test_quantize_groups_above_one_is_the_channel_strategy():
    config = _config("quantization")
    config["compression_training"]["weight_quantization"]["shared_parameters"][
        "quantize_groups"
    ] = 8
    (modifier,) = Recipe.from_deepspeed(config).modifiers
    assert modifier.config_groups["wq1"].weights.strategy == "channel"


def test_dynamic_activation_ranges_alone():
    config = _only(_config("quantization"), "activation_quantization")
    shared = config["compression_training"]["activation_quantization"]["shared_parameters"]
    shared["range_calibration"] = "dynamic"
    del config["compression_training"]["activation_quantization"]["different_groups"]["aq1"][
        "modules"
    ]  # DeepSpeed's default "*": every Linear
    (modifier,) = Recipe.from_deepspeed(config).modifiers
    group = modifier.config_groups["aq1"]
    assert group.input_activations.dynamic is True and group.weights is None
    assert group.targets == ["Linear"]
    model = _bert()
    _train(model, Recipe.from_modifiers([modifier]), steps=3)
    assert hasattr(model.classifier, "quantization_scheme")
    assert not hasattr(model.classifier, "input_scale")  # dynamic: no stored range


def _default_offsets_config() -> dict:
    """DeepSpeed's default layout: weights from offset 0, activations left at their own
    default offset (1000 in DeepSpeed's code), here 3 to fit a short run."""
    config = _config("quantization")
    weights = config["compression_training"]["weight_quantization"]["shared_parameters"]
    del weights["schedule_offset"]  # DeepSpeed's default: 0
    acts = config["compression_training"]["activation_quantization"]["shared_parameters"]
    acts["schedule_offset"] = 3
    return config


def test_activations_later_than_weights_become_activation_start():
    (modifier,) = Recipe.from_deepspeed(_default_offsets_config()).modifiers
    assert (modifier.start, modifier.activation_start) == (0, 3)
    _roundtrip(Recipe.from_modifiers([modifier]))
    # the code's default offset (1000) when the key is left out
    config = _config("quantization")
    del config["compression_training"]["weight_quantization"]["shared_parameters"][
        "schedule_offset"
    ]
    del config["compression_training"]["activation_quantization"]["shared_parameters"][
        "schedule_offset"
    ]
    (modifier,) = Recipe.from_deepspeed(config).modifiers
    assert (modifier.start, modifier.activation_start) == (0, 1000)


def test_activations_later_than_weights_run_on_tiny_bert():
    model = _bert()
    query = model.bert.encoder.layer[0].attention.self.query
    raw, seen = [], []
    query.register_forward_pre_hook(lambda m, args: raw.append(args[0].detach()))
    query.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    _train(model, Recipe.from_deepspeed(_default_offsets_config()), steps=6)
    # steps 0-2 untouched inputs, quantized from step 3 (8 bits: at most 256 levels)
    assert [torch.equal(r, s) for r, s in zip(raw, seen, strict=True)] == [True] * 3 + [False] * 3
    assert all(len(torch.unique(s)) <= 256 for s in seen[3:])
    assert hasattr(query, "input_scale") and hasattr(query, "weight_scale")


# ---------------------------------------------------------------- pruning
def test_pruning_config_maps_to_the_pruning_modifiers():
    recipe = Recipe.from_deepspeed(DATA / "ds_bert_pruning.json")
    sparse, row, head = recipe.modifiers
    assert type(sparse).__name__ == "SparsePruningModifier"
    assert (sparse.start, sparse.end, sparse.density, sparse.method) == (2, 6, 0.5, "l1")
    assert sparse.targets == ["re:.*attention.self.(query|key)"]
    assert type(row).__name__ == "RowPruningModifier"
    assert (row.start, row.end, row.density, row.init_density) == (2, None, 0.5, 0.5)
    assert row.method == "topk" and row.targets == ["re:.*intermediate.dense"]
    assert type(head).__name__ == "HeadPruningModifier"
    assert head.num_heads == 4 and head.targets == ["re:.*self.query"]
    _roundtrip(recipe)


def test_sparse_pruning_reaches_the_dense_ratio():
    model = _bert()
    _train(model, Recipe.from_deepspeed(_only(_config("pruning"), "sparse_pruning")))
    for layer in model.bert.encoder.layer:
        for linear in (layer.attention.self.query, layer.attention.self.key):
            assert (linear.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
        assert (layer.attention.self.value.weight == 0).float().mean().item() < 0.01


def test_row_pruning_shrinks_intermediate_and_its_consumer():
    model = _bert()
    _train(model, Recipe.from_deepspeed(_only(_config("pruning"), "row_pruning")))
    layer = model.bert.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 32
    assert layer.output.dense.in_features == 32
    assert model.config.intermediate_size == 32
    model(input_ids=torch.randint(0, 64, (1, 8)))


def test_head_pruning_removes_half_the_heads():
    model = _bert()
    _train(model, Recipe.from_deepspeed(_only(_config("pruning"), "head_pruning")))
    attention = model.bert.encoder.layer[1].attention
    assert attention.self.query.out_features == 16  # 2 of 4 heads of size 8
    assert attention.output.dense.in_features == 16
    model(input_ids=torch.randint(0, 64, (1, 8)))


def test_each_deepspeed_group_is_a_recipe_group():
    recipe = Recipe.from_deepspeed(DATA / "ds_bert_pruning.json")
    names = [group.name for group in recipe.stages[0].groups]
    assert names == ["sparse_pruning_sp1", "row_pruning_rp1", "head_pruning_rp1"]
    assert "row_pruning_rp1_modifiers" in recipe.to_yaml()
    (row,) = recipe.stages[0].groups[1].modifiers
    assert row.related_modules == ["re:.*layer.\\w+.output.dense"]
    (head,) = recipe.stages[0].groups[2].modifiers
    assert head.related_modules[-1] == "re:.*attention.output.dense"  # DeepSpeed's modules


def test_related_modules_disagreeing_with_the_model_name_technique_group_and_pattern():
    config = _only(_config("pruning"), "row_pruning")
    group = config["compression_training"]["row_pruning"]["different_groups"]["rp1"]
    group["related_modules"] = [["attention.output.dense"]]  # reads no MLP row
    recipe = Recipe.from_deepspeed(config)  # fine until a model is seen
    with pytest.raises(ValueError) as info:
        _train(_bert(), recipe, steps=1)
    message = str(info.value)
    assert "RowPruningModifier (recipe group 'row_pruning_rp1')" in message
    assert "'re:.*attention.output.dense'" in message


def test_head_pruning_num_heads_is_checked_against_the_model():
    config = _only(_config("pruning"), "head_pruning")
    config["compression_training"]["head_pruning"]["shared_parameters"]["num_heads"] = 8
    with pytest.raises(ValueError, match="num_heads=8.*num_attention_heads=4"):
        _train(_bert(), Recipe.from_deepspeed(config), steps=1)


# ---------------------------------------------------------------- layer reduction
def test_layer_reduction_keeps_the_teacher_layers():
    recipe = Recipe.from_deepspeed(DATA / "ds_bert_layer_reduction.json")
    (modifier,) = recipe.modifiers
    assert type(modifier).__name__ == "LayerReductionModifier"
    assert (modifier.keep_number_layer, modifier.teacher_layer) == (2, [1, 3])
    assert modifier.module_name_prefix == "bert.encoder.layer"
    _roundtrip(recipe)
    model = _bert(layers=4)
    kept = [model.bert.encoder.layer[i].output.dense.weight.clone() for i in (1, 3)]
    _train(model, recipe, steps=2)
    assert len(model.bert.encoder.layer) == 2 and model.config.num_hidden_layers == 2
    assert kept[0].shape == model.bert.encoder.layer[0].output.dense.weight.shape


# ---------------------------------------------------------------- errors
def _error(config: dict, *needles: str) -> None:
    with pytest.raises(RecipeError) as info:
        Recipe.from_deepspeed(config)
    for needle in needles:
        assert needle in str(info.value)


def test_activations_before_the_weights_are_rejected():
    config = _config("quantization")
    config["compression_training"]["activation_quantization"]["shared_parameters"][
        "schedule_offset"
    ] = 1  # the weights start at 2
    _error(config, "activation_quantization", "aq1", "schedule_offset", "activation_start")


def _deepspeed_assignment(model: torch.nn.Module, config: dict) -> dict[str, tuple]:
    """DeepSpeed's rule, written down from ``deepspeed/compression/compress.py``: a technique's
    group takes every compressible layer whose name a key of its ``modules`` finds
    (``re.search``); a layer found twice within one technique is an error there. Returns
    layer name -> (weight bits or None, activation bits or None) for the Linear layers."""
    import re

    training = config["compression_training"]

    def owner(technique: str, name: str) -> dict | None:
        found = [
            group
            for group in training.get(technique, {}).get("different_groups", {}).values()
            for key in group.get("modules", ["*"])
            if key == "*" or re.search(key, name)
        ]
        assert len(found) <= 1, f"DeepSpeed refuses {name} in two {technique} groups"
        return found[0] if found else None

    result = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weights = owner("weight_quantization", name)
            acts = owner("activation_quantization", name)
            result[name] = (
                weights["params"]["target_bits"] if weights else None,
                acts["params"]["bits"] if acts else None,
            )
    return result


def _our_assignment(model: torch.nn.Module) -> dict[str, tuple]:
    result = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            scheme = getattr(module, "quantization_scheme", None)
            weights = getattr(scheme, "weights", None)
            acts = getattr(scheme, "input_activations", None)
            result[name] = (
                weights.num_bits if weights else None,
                acts.num_bits if acts else None,
            )
    return result


def _groups(
    weights: dict[str, tuple[int, list[str]]], acts: dict[str, tuple[int, list[str]]]
) -> dict:
    config = _config("quantization")
    training = config["compression_training"]
    training["weight_quantization"]["shared_parameters"]["schedule_offset"] = 0
    training["activation_quantization"]["shared_parameters"]["schedule_offset"] = 0
    training["weight_quantization"]["different_groups"] = {
        name: {"params": {"start_bits": bits, "target_bits": bits}, "modules": modules}
        for name, (bits, modules) in weights.items()
    }
    training["activation_quantization"]["different_groups"] = {
        name: {"params": {"bits": bits}, "modules": modules}
        for name, (bits, modules) in acts.items()
    }
    return config


_LAYOUTS = {
    # ZeroQuant's BERT config: 8-bit attention with 8-bit inputs, 4-bit MLP without
    "zeroquant": _groups(
        {
            "wq1": (8, ["attention.self", "attention.output.dense"]),
            "wq2": (4, ["intermediate", r"layer.\w+.output.dense"]),
        },
        {"aq1": (8, ["attention.self", "attention.output.dense"])},
    ),
    # DeepSpeed's GPT-2 W4/8A8 layout: one activation group over both weight groups
    "one_activation_group_over_two": _groups(
        {
            "wq1": (4, ["intermediate", r"layer.\w+.output.dense"]),
            "wq2": (8, ["attention.self", "attention.output.dense"]),
        },
        {
            "aq1": (
                8,
                [
                    "attention.self",
                    "attention.output.dense",
                    "intermediate",
                    r"layer.\w+.output.dense",
                ],
            )
        },
    ),
    # an activation key inside a weight key's layers, and one beyond every weight group
    "overlapping_keys": _groups(
        {"wq1": (4, ["layer.0"])},
        {"aq1": (8, ["attention.self"]), "aq2": (4, ["intermediate"])},
    ),
    "every_linear_weights": _groups({"wq1": (4, ["*"])}, {"aq1": (8, ["attention.output"])}),
    "every_linear_inputs": _groups({"wq1": (4, ["attention"])}, {"aq1": (4, ["*"])}),
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
def test_activation_groups_quantize_the_layers_deepspeed_gives_them(layout):
    config = _LAYOUTS[layout]
    model = _bert()
    expected = _deepspeed_assignment(model, config)
    assert len({bits for bits in expected.values()}) > 1  # the layout tells layers apart
    _train(model, Recipe.from_deepspeed(config), steps=2)
    assert _our_assignment(model) == expected
    _roundtrip(Recipe.from_deepspeed(config))


def test_activation_only_layers_keep_their_weights_and_quantize_their_inputs():
    model = _bert()
    dense = model.bert.encoder.layer[1].intermediate.dense
    seen = []
    dense.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    _train(model, Recipe.from_deepspeed(_LAYOUTS["overlapping_keys"]), steps=2)
    assert hasattr(dense, "input_scale") and not hasattr(dense, "weight_scale")
    assert len(torch.unique(seen[-1])) <= 256 < seen[-1].numel()


def _mixed_config(in_forward: bool = False) -> dict:
    config = _only(_config("quantization"), "weight_quantization")
    shared = config["compression_training"]["weight_quantization"]["shared_parameters"]
    shared["fp16_mixed_quantize"] = {"enabled": True, "quantize_change_ratio": 0.25}
    shared["quantize_weight_in_forward"] = in_forward
    group = config["compression_training"]["weight_quantization"]["different_groups"]["wq1"]
    group["params"] = {"start_bits": 4, "target_bits": 4}  # no bit drops: a plain blend
    return config


def test_fp16_mixed_quantize_becomes_weight_blend_rate():
    recipe = Recipe.from_deepspeed(_mixed_config())
    (modifier,) = recipe.modifiers
    assert modifier.weight_blend_rate == 0.25 and modifier.start == 2
    _roundtrip(recipe)
    # DeepSpeed's in-forward quantization never blends
    (direct,) = Recipe.from_deepspeed(_mixed_config(in_forward=True)).modifiers
    assert direct.weight_blend_rate is None


def test_fp16_mixed_quantize_blends_into_quantized_weights_on_tiny_bert():
    model = _bert()
    query = model.bert.encoder.layer[0].attention.self.query
    original = query.weight
    distinct = []
    query.register_forward_hook(
        lambda m, args, out: distinct.append(len(torch.unique(m.weight.detach()[0])))
    )
    _train(model, Recipe.from_deepspeed(_mixed_config()), steps=7)
    # full precision until the start (step 2), then shares 0.75, 0.5, 0.25, 0, 0
    assert all(n > 16 for n in distinct[:5]) and all(n <= 16 for n in distinct[5:])
    assert query.weight is original and hasattr(query, "weight_scale")


def _weights_only(in_forward: bool, rounding: str = "nearest") -> dict:
    config = _only(_config("quantization"), "weight_quantization")
    shared = config["compression_training"]["weight_quantization"]["shared_parameters"]
    shared.update(quantize_weight_in_forward=in_forward, rounding=rounding)
    return config  # 8 -> 4 bits, period 2, from step 2


def test_quantize_weight_in_forward_means_fixed_target_bits():
    from loguru import logger

    messages = []
    sink = logger.add(messages.append, level="INFO")
    try:
        recipe = Recipe.from_deepspeed(_weights_only(in_forward=True, rounding="stochastic"))
    finally:
        logger.remove(sink)
    (modifier,) = recipe.modifiers
    # DeepSpeed's in-forward path: target bits from the start, round to nearest, no schedule
    progressive = (modifier.start_bits, modifier.target_bits, modifier.quantization_period)
    assert progressive == (None, None, None)
    assert modifier.config_groups["wq1"].weights.num_bits == 4 and modifier.start == 2
    assert modifier.rounding == "nearest"
    warnings = [m for m in messages if m.record["level"].name == "WARNING"]
    assert any("rounding=stochastic" in m for m in warnings)
    assert any("start_bits=8 and quantization_period=2 unused" in m for m in messages)
    _roundtrip(recipe)
    # the MoQ path (false) keeps the schedule and the rounding
    (moq,) = Recipe.from_deepspeed(_weights_only(in_forward=False, rounding="stochastic")).modifiers
    assert (moq.start_bits, moq.target_bits, moq.quantization_period) == (8, 4, 2)
    assert moq.rounding == "stochastic"


@pytest.mark.parametrize(("in_forward", "bits_at_start"), [(True, 4), (False, 8)])
def test_quantize_weight_in_forward_on_tiny_bert(in_forward, bits_at_start):
    model = _bert()
    query = model.bert.encoder.layer[0].attention.self.query
    distinct = []
    query.register_forward_hook(
        lambda m, args, out: distinct.append(len(torch.unique(m.weight.detach())))
    )
    _train(model, Recipe.from_deepspeed(_weights_only(in_forward)), steps=4)
    # full precision for steps 0-1 (1024 distinct values); from step 2 at most 2**bits codes
    # (one scale per tensor): in the forward at 4 bits at once, the MoQ path still at 8 bits
    # in the forward of step 2 (its first drop is at step 3, to 7 bits)
    assert distinct[:2] == [1024, 1024]
    assert 2 ** (bits_at_start - 1) < distinct[2] <= 2**bits_at_start
    assert distinct[3] <= (16 if in_forward else 128)


def test_quantization_period_zero_is_rejected_on_the_moq_path_only():
    config = _weights_only(in_forward=False)
    group = config["compression_training"]["weight_quantization"]["different_groups"]["wq1"]
    group["params"]["quantization_period"] = 0  # DeepSpeed: a bit less at every update
    _error(config, "weight_quantization", "wq1", "quantization_period")
    config["compression_training"]["weight_quantization"]["shared_parameters"][
        "quantize_weight_in_forward"
    ] = True  # the period is unused there
    (modifier,) = Recipe.from_deepspeed(config).modifiers
    assert modifier.quantization_period is None


def test_related_modules_on_sparse_pruning_are_rejected():
    config = _only(_config("pruning"), "sparse_pruning")
    group = config["compression_training"]["sparse_pruning"]["different_groups"]["sp1"]
    group["related_modules"] = [["output.dense"]]
    _error(config, "sparse_pruning", "sp1", "related_modules")


def test_head_pruning_without_related_modules_is_rejected():
    config = _only(_config("pruning"), "head_pruning")
    del config["compression_training"]["head_pruning"]["different_groups"]["rp1"]["related_modules"]
    _error(config, "head_pruning", "rp1", "related_modules")


def test_bits_our_modifier_cannot_run_name_the_group():
    config = _config("quantization")
    group = config["compression_training"]["weight_quantization"]["different_groups"]["wq1"]
    group["params"] = {"start_bits": 32, "target_bits": 16}
    _error(config, "weight_quantization", "wq1", "QuantizationModifier")


def test_nothing_enabled_is_an_error():
    _error({"compression_training": {}}, "no technique is enabled")


def test_a_training_config_without_compression_training_says_so():
    training_only = {"train_batch_size": 8, "fp16": {"enabled": True}, "optimizer": {}}
    _error(training_only, "no compression_training section", "train_batch_size", "sparse_pruning")
    # a bare block with a misspelt technique names the key and the techniques
    _error({"weight_quantisation": {}}, "weight_quantisation", "weight_quantization")


# ---------------------------------------------------------------- CLI
def test_cli_convert_writes_yaml_that_loads_to_the_same_recipe(tmp_path, capsys):
    out = tmp_path / "recipe.yaml"
    src = str(DATA / "ds_bert_pruning.json")
    assert main(["recipe", "convert", "--from", "deepspeed", src, "-o", str(out)]) == 0
    assert Recipe.from_file(out) == Recipe.from_deepspeed(src)
    assert main(["recipe", "convert", "--from", "deepspeed", src]) == 0
    assert Recipe.from_yaml(capsys.readouterr().out) == Recipe.from_deepspeed(src)


def test_cli_convert_reports_errors(tmp_path, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"compression_training": {"weight_quantization": {"x": 1}}}))
    assert main(["recipe", "convert", "--from", "deepspeed", str(bad)]) == 2
    assert "weight_quantization" in capsys.readouterr().err
