"""Schedule offsets (start, end, update) no run reaches are refused when a recipe is parsed."""

import pytest

from compressor import Recipe, RecipeError

PRUNE = """
prune_stage:
  prune_modifiers:
    SparsePruningModifier: {density: 0.5}
"""


@pytest.mark.parametrize(
    "field, text, expected",
    [
        ("start", ".nan", "finite"),
        ("start", "1e308", "finite"),
        ("end", "-.inf", "finite"),
        ("update", ".inf", "finite"),
        ("start", "yes", "boolean"),
        ("end", "on", "boolean"),
    ],
)
def test_absurd_schedule_offsets_are_refused_at_parse_time(field, text, expected):
    yaml_text = PRUNE.replace("{density: 0.5}", "{density: 0.5, " + f"{field}: {text}" + "}")
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(yaml_text)
    message = str(err.value)
    assert f"SparsePruningModifier -> {field}: " in message and expected in message


def test_ordinary_schedule_offsets_are_kept():
    recipe = Recipe.from_yaml(
        PRUNE.replace("{density: 0.5}", "{density: 0.5, start: -1, end: 1e6, update: 0.5}")
    )
    modifier = recipe.modifiers[0]
    assert (modifier.start, modifier.end, modifier.update) == (-1, 1e6, 0.5)


def test_modifiers_built_in_python_refuse_them_too():
    from pydantic import ValidationError

    from compressor.modifiers.pruning import SparsePruningModifier

    with pytest.raises(ValidationError, match="start must be a finite number"):
        SparsePruningModifier(density=0.5, start=float("nan"))
    modifier = SparsePruningModifier(density=0.5, start=0)
    with pytest.raises(ValidationError, match="end is a number of optimizer steps"):
        modifier.end = True
