"""QuantizationModifier's fields: parse-time validation, model checks, recipe round-trip."""

from __future__ import annotations

import pytest
import torch
from loguru import logger

from compressor import Recipe, RecipeError, create_session
from compressor.modifiers import QuantizationModifier
from compressor.modifiers.quantization import SUPPORTED_PRESETS, resolve_quantization_config


def _parse(args: dict) -> QuantizationModifier:
    recipe = Recipe.from_dict({"modifiers": [{"QuantizationModifier": args}]})
    (modifier,) = recipe.modifiers
    assert isinstance(modifier, QuantizationModifier)
    return modifier


def test_unknown_preset_lists_the_allowed_ones():
    with pytest.raises(RecipeError) as err:
        _parse({"scheme": "W4A17"})
    message = str(err.value)
    assert "W4A17" in message and "scheme" in message
    for name in ("W4A16", "W8A8", "FP8_DYNAMIC"):
        assert name in message


def test_known_but_unsupported_preset_says_why():
    # FP6 has no grid here
    with pytest.raises(RecipeError, match="MXFP6A16.*float num_bits.*supported presets"):
        _parse({"scheme": "MXFP6A16"})


def test_scheme_and_config_groups_are_exclusive():
    groups = {"g": {"weights": {"num_bits": 4, "group_size": 16}}}
    with pytest.raises(RecipeError, match="exclusive"):
        _parse({"scheme": "W4A16", "config_groups": groups})
    with pytest.raises(RecipeError, match="give scheme"):
        _parse({})
    with pytest.raises(RecipeError, match="kv_cache_scheme: strategy 'channel'"):
        _parse({"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "channel"}})


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"num_bits": 12}, "num_bits=12"),
        ({"num_bits": 6, "type": "float"}, "float num_bits"),
        ({"num_bits": 4, "type": "float"}, "FP4 with strategy 'tensor'"),
        ({"num_bits": 4, "strategy": "token", "dynamic": True}, "dynamic"),
        ({"num_bits": 4, "observer": "mse"}, "observer='mse'"),
    ],
)
def test_bits_and_strategies_a_scheme_cannot_take(weights, expected):
    with pytest.raises(RecipeError, match=expected):
        _parse({"config_groups": {"g": {"weights": weights}}})


def test_static_token_activations_are_rejected_by_compressed_tensors_args():
    group = {"weights": {"num_bits": 8}, "input_activations": {"strategy": "token"}}
    with pytest.raises(RecipeError, match="token"):
        _parse({"config_groups": {"g": group}})


def test_static_group_activations_are_refused_with_the_dynamic_alternative():
    """compressed-tensors' forward fails on one fixed scale per activation group (it
    quantizes activation groups per token), so the recipe is refused when parsed."""
    static = {"num_bits": 8, "strategy": "group", "group_size": 32, "dynamic": False}
    group = {"weights": {"num_bits": 8}, "input_activations": static}
    with pytest.raises(RecipeError, match="input_activations.*'group'.*dynamic: true"):
        _parse({"config_groups": {"g": group}})
    group["input_activations"] = {**static, "dynamic": True}
    assert _parse({"config_groups": {"g": group}}) is not None


def test_case_insensitive_preset_and_lowercase_string_targets():
    modifier = _parse({"scheme": "w4a16", "targets": "Linear"})
    assert modifier.scheme == "W4A16" and modifier.targets == ["Linear"]


def test_training_only_options_need_start():
    with pytest.raises(RecipeError, match="stochastic.*start"):
        _parse({"scheme": "W4A16", "rounding": "stochastic"})
    with pytest.raises(RecipeError, match="together"):
        _parse({"scheme": "W4A16", "start": 0, "start_bits": 8})
    with pytest.raises(RecipeError, match="target_bits=4 must equal"):
        _parse(
            {
                "scheme": "W8A16",
                "start": 0,
                "start_bits": 8,
                "target_bits": 4,
                "quantization_period": 2,
            }
        )
    with pytest.raises(RecipeError, match="momentum"):
        _parse({"scheme": "W8A8", "momentum": 1.5})


def test_recipe_round_trips_through_yaml():
    recipe = Recipe.from_dict(
        {
            "modifiers": [
                {
                    "QuantizationModifier": {
                        "ignore": ["lm_head", "re:.*down_proj"],
                        "config_groups": {
                            "g": {
                                "weights": {"num_bits": 4, "group_size": 16, "symmetric": False},
                                "input_activations": {"num_bits": 8, "dynamic": False},
                            }
                        },
                        "observer": "moving_average",
                        "momentum": 0.9,
                    }
                }
            ]
        }
    )
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    (first,), (second,) = recipe.modifiers, again.modifiers
    assert first.resolve_quantization_config() == second.resolve_quantization_config()


def test_requires_calibration_data_only_for_static_activation_ranges():
    assert not QuantizationModifier(scheme="W4A16").requires_calibration_data()
    assert not QuantizationModifier(scheme="W8A8").requires_calibration_data()
    assert not QuantizationModifier(scheme="FP8_DYNAMIC").requires_calibration_data()
    assert QuantizationModifier(scheme="FP8").requires_calibration_data()


def test_resolved_preset_keeps_targets_and_ignore():
    config = resolve_quantization_config(scheme="W8A8", targets=["re:.*proj"], ignore=["x"])
    (group,) = config.config_groups.values()
    assert group.targets == ["re:.*proj"] and config.ignore == ["x"]
    assert set(SUPPORTED_PRESETS) >= {"W4A16", "W8A8", "FP8_DYNAMIC", "FP8"}


# ------------------------------------------------------------------ checks against the model
def _initialize(model: torch.nn.Module, modifier: QuantizationModifier) -> None:
    with create_session() as session:
        session.initialize(model, [modifier])


def test_group_size_not_dividing_a_layer_names_the_layer(tiny_llama):
    # tiny_llama: hidden 32, MLP 64; group 64 does not divide the 32-wide inputs
    modifier = QuantizationModifier(
        config_groups={"g": {"weights": {"num_bits": 4, "group_size": 64}}}
    )
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*input width 32"):
        _initialize(tiny_llama, modifier)


def test_target_matching_nothing_warns_naming_the_pattern(tiny_llama):
    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        modifier = QuantizationModifier(
            scheme="W8A8", targets=["Linear", "re:.*no_such_layer"], ignore=["lm_head"]
        )
        _initialize(tiny_llama, modifier)
    finally:
        logger.remove(sink)
    assert any("re:.*no_such_layer" in m for m in messages)
    assert len(modifier.quantized_modules) == 14  # 7 Linear per layer, lm_head ignored


def test_targets_matching_no_module_at_all_is_an_error(tiny_llama):
    modifier = QuantizationModifier(scheme="W8A8", targets=["re:.*nothing_here"])
    with pytest.raises(ValueError, match="match no Linear or Embedding"):
        _initialize(tiny_llama, modifier)


def test_container_target_is_reported_as_unquantizable(tiny_llama):
    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        with pytest.raises(ValueError, match="match no"):
            _initialize(tiny_llama, QuantizationModifier(scheme="W8A8", targets=["LlamaMLP"]))
    finally:
        logger.remove(sink)
    assert any("LlamaMLP" in m and "cannot be quantized" in m for m in messages)


def test_embedding_activations_are_rejected(tiny_llama):
    modifier = QuantizationModifier(scheme="W8A8", targets=["Embedding"])
    with pytest.raises(ValueError, match="embed_tokens.*token ids"):
        _initialize(tiny_llama, modifier)
