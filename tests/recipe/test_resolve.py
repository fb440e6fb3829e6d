"""Recipes given as strings, as llm-compressor users pass them: a file's path or YAML text."""

import pytest
import torch

from compressor import CompressionSession, Recipe, RecipeError
from compressor.recipe import resolve_recipe
from recording import RecordingModifier

TEXT = "quant_stage:\n  record_modifiers:\n    RecordingModifier: {tag: a}\n"


def test_a_string_naming_an_existing_file_is_that_file(tmp_path, monkeypatch):
    (tmp_path / "recipe.yaml").write_text(TEXT)
    expected = Recipe.from_yaml(TEXT)
    assert resolve_recipe(str(tmp_path / "recipe.yaml")) == expected
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("recipe.yaml") == expected  # relative to the working directory


def test_a_string_with_a_newline_is_yaml_text():
    recipe = resolve_recipe(TEXT)
    assert [(type(m), m.tag) for m in recipe.modifiers] == [(RecordingModifier, "a")]
    # read as YAML, so a YAML mistake is reported as one, naming the place
    with pytest.raises(RecipeError, match="quant_stage -> 'g'"):
        resolve_recipe("quant_stage:\n  g:\n    RecordingModifier: {}\n")


def test_any_other_string_is_refused_with_both_readings(tmp_path):
    missing = tmp_path / "recipe.yaml"
    with pytest.raises(ValueError) as info:
        resolve_recipe(str(missing))
    message = str(info.value)
    assert f"no file exists at {missing}" in message  # the path reading
    assert "as YAML text, it has no newline" in message  # the YAML reading
    # a one-line YAML mapping is not guessed either
    with pytest.raises(ValueError, match="neither of the two things"):
        resolve_recipe("modifiers: [{RecordingModifier: {}}]")


def test_the_session_resolves_strings_by_the_same_rules(tiny_llama, tmp_path):
    session = CompressionSession()
    session.initialize(model=tiny_llama, recipe=TEXT)
    assert [m.tag for m in session.modifiers] == ["a"]
    session.finalize()
    with pytest.raises(ValueError, match="neither of the two things"):
        CompressionSession().initialize(model=torch.nn.Linear(2, 2), recipe="recipe.yaml")
