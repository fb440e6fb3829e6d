"""Recipes refused up front: duplicate keys, oversized or over-nested input, alias bombs,
patterns that backtrack catastrophically, and schedule offsets no run reaches."""

import json
import time

import pytest

from compressor import Recipe, RecipeError
from compressor.recipe.limits import MAX_RECIPE_BYTES, MAX_RECIPE_DEPTH, MAX_RECIPE_VALUES

PRUNE = """
prune_stage:
  prune_modifiers:
    SparsePruningModifier: {density: 0.5}
"""


# ---------------------------------------------------------------- duplicate keys
def test_a_stage_given_twice_is_an_error_naming_the_key_and_its_lines():
    text = PRUNE + "prune_stage:\n  other_modifiers:\n    RowPruningModifier: {density: 0.5}\n"
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(text)
    message = str(err.value)
    assert "duplicate key 'prune_stage'" in message
    assert "line 5" in message and "first at line 2" in message


def test_a_field_given_twice_is_an_error_naming_the_modifier_and_the_field():
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(PRUNE.replace("{density: 0.5}", "{density: 0.5, density: 0.9}"))
    message = str(err.value)
    assert message.startswith("prune_stage -> prune_modifiers -> SparsePruningModifier: ")
    assert "duplicate key 'density'" in message and "line 4" in message


def test_a_modifier_given_twice_in_a_group_mapping_is_an_error():
    text = PRUNE + "    SparsePruningModifier: {density: 0.9}\n"
    with pytest.raises(RecipeError, match="prune_stage -> prune_modifiers: duplicate key"):
        Recipe.from_yaml(text)


def test_a_merge_key_may_be_overridden_and_a_group_list_may_repeat_a_modifier():
    recipe = Recipe.from_yaml(
        """
prune_stage:
  prune_modifiers:
    - SparsePruningModifier: &base {density: 0.5, ignore: [lm_head]}
    - SparsePruningModifier: {<<: *base, density: 0.8}
"""
    )
    assert [m.density for m in recipe.modifiers] == [0.5, 0.8]
    assert recipe.modifiers[1].ignore == ["lm_head"]


def test_a_deepspeed_json_key_given_twice_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    block = '{"sparse_pruning": {"shared_parameters": {"enabled": true}}}'
    path.write_text('{"compression_training": ' + block + ', "compression_training": {}}')
    with pytest.raises(RecipeError, match="duplicate key 'compression_training'"):
        Recipe.from_deepspeed(path)
    json.loads(path.read_text())  # plain json would have kept the last one, silently


# ---------------------------------------------------------------- size, nesting, aliases
def _alias_bomb(levels: int, fan_out: int = 9) -> str:
    lines = [
        "prune_stage:",
        "  prune_modifiers:",
        "    SparsePruningModifier:",
        "      density: 0.5",
    ]
    lines.append("      targets: &l0 [" + ", ".join(["lm_head"] * fan_out) + "]")
    for level in range(1, levels):
        lines.append(f"      x{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * fan_out) + "]")
    lines.append(f"      ignore: *l{levels - 1}")
    return "\n".join(lines) + "\n"


def test_aliases_expanding_beyond_the_limit_are_refused_before_validation():
    text = _alias_bomb(6)  # 9**6 = 531441 values from a few hundred bytes
    assert len(text) < 1000
    began = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(text)
    assert time.perf_counter() - began < 2
    message = str(err.value)
    assert f"more than {MAX_RECIPE_VALUES:,} values" in message and "aliases" in message
    assert len(message) < 400


def test_the_eight_deep_billion_laughs_recipe_is_refused_at_once():
    began = time.perf_counter()
    with pytest.raises(RecipeError, match="values"):
        Recipe.from_yaml(_alias_bomb(8))
    assert time.perf_counter() - began < 2


def test_errors_quote_a_bounded_part_of_the_offending_input():
    names = ", ".join(f"model.layers.{i}.mlp" for i in range(20_000))
    text = PRUNE.replace("{density: 0.5}", "{density: [" + names + "]}")
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(text)
    message = str(err.value)
    assert "SparsePruningModifier -> density: got ['model.layers.0.mlp'" in message
    assert len(message) < 1000


def test_many_invalid_values_list_ten_problems_and_count_the_rest():
    text = PRUNE.replace("{density: 0.5}", "{density: 0.5, ignore: [" + "1, " * 499 + "1]}")
    message = str(pytest.raises(RecipeError, Recipe.from_yaml, text).value)
    assert message.count("ignore -> ") == 10 and "and 490 more problem(s)" in message


@pytest.mark.parametrize("depth", [MAX_RECIPE_DEPTH + 1, 5000])
def test_deeply_nested_yaml_is_a_recipe_error_naming_the_place(depth):
    text = PRUNE.replace("{density: 0.5}", "{ignore: " + "[" * depth + "]" * depth + "}")
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(text)
    message = str(err.value)
    assert message.startswith("prune_stage -> prune_modifiers -> SparsePruningModifier -> ignore")
    assert f"deeper than {MAX_RECIPE_DEPTH} levels" in message


def test_aliases_that_nest_deep_once_expanded_are_refused():
    lines = ["prune_stage:", "  prune_modifiers:", "    SparsePruningModifier:"]
    lines.append("      x0: &a0 " + "[" * 40 + "]" * 40)
    lines += [f"      x{i}: &a{i} " + "[" * 40 + f"*a{i - 1}" + "]" * 40 for i in range(1, 5)]
    with pytest.raises(
        RecipeError, match=f"with its aliases expanded .* deeper than {MAX_RECIPE_DEPTH}"
    ):
        Recipe.from_yaml("\n".join(lines) + "\n")


def test_a_recursive_alias_is_refused():
    with pytest.raises(RecipeError, match="recursive"):
        Recipe.from_yaml(PRUNE.replace("{density: 0.5}", "{ignore: &a [*a]}"))


def test_deeply_nested_and_self_containing_dicts_are_recipe_errors():
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(RecipeError, match="modifiers -> \\[0\\] -> SparsePruningModifier"):
        Recipe.from_dict({"modifiers": [{"SparsePruningModifier": {"ignore": nested}}]})
    looped: dict = {"density": 0.5}
    looped["self"] = looped
    with pytest.raises(RecipeError, match="contains itself"):
        Recipe.from_dict({"modifiers": [{"SparsePruningModifier": looped}]})


def test_recipe_text_over_the_size_cap_is_refused_before_parsing(tmp_path):
    text = PRUNE + ("# padding\n" * (MAX_RECIPE_BYTES // 10))
    assert len(text) > MAX_RECIPE_BYTES
    with pytest.raises(RecipeError, match=f"above the {MAX_RECIPE_BYTES:,}-byte limit"):
        Recipe.from_yaml(text)
    path = tmp_path / "big.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="big.yaml: .* bytes, above"):
        Recipe.from_file(path)
    assert len(Recipe.from_yaml(PRUNE + "# padding\n" * 1000).modifiers) == 1


# ---------------------------------------------------------------- patterns
CATASTROPHIC = "re:^(([a-z_.0-9])+)+X$"


@pytest.mark.parametrize(
    "modifier, where",
    [
        ("QuantizationModifier: {scheme: W4A16, ignore: ['%s']}", "ignore -> 0"),
        ("QuantizationModifier: {scheme: W4A16, targets: [Linear, '%s']}", "targets -> 1"),
        (
            "QuantizationModifier: {config_groups: {g: {targets: ['%s'], weights: {num_bits: 4}}}}",
            "config_groups -> g -> targets -> 0",
        ),
        ("GPTQModifier: {scheme: W4A16, ignore: ['%s']}", "ignore -> 0"),
        ("SparsePruningModifier: {density: 0.5, ignore: ['%s']}", "ignore -> 0"),
        ("RowPruningModifier: {density: 0.5, related_modules: ['%s']}", "related_modules -> 0"),
        ("ConstantPruningModifier: {targets: ['%s']}", "targets -> 0"),
        ("SpinQuantModifier: {norm_mappings: [{norm: '%s', linears: [a]}]}", "norm"),
    ],
)
def test_patterns_that_backtrack_catastrophically_are_refused_naming_field_and_pattern(
    modifier, where
):
    text = "quant_stage:\n  quant_modifiers:\n    " + modifier % CATASTROPHIC + "\n"
    began = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(text)
    assert time.perf_counter() - began < 2
    message = str(err.value)
    assert where in message and CATASTROPHIC in message
    assert "catastrophic backtracking" in message


def test_a_regex_that_does_not_compile_is_refused_when_parsed():
    with pytest.raises(RecipeError, match="not a valid regular expression"):
        Recipe.from_yaml(PRUNE.replace("{density: 0.5}", "{density: 0.5, ignore: ['re:((']}"))


def test_the_patterns_recipes_use_are_accepted():
    patterns = [
        "re:.*lm_head",
        "re:model.layers.\\d+.mlp.*.weight",
        "re:.*self_attn.(k|q|v)_proj$",
        "re:.*(q|k|v|o|gate|up|down)_proj$",
        "re:.*mlp.gate$",
        "lm_head",
        "Linear",
    ]
    recipe = Recipe.from_dict(
        {"modifiers": [{"QuantizationModifier": {"scheme": "W4A16", "ignore": patterns}}]}
    )
    assert recipe.modifiers[0].ignore == patterns
