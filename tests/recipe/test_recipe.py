import pytest

from compressor import Recipe, RecipeError
from recording import RecordingModifier

STAGED = """
first_stage:
  record_modifiers:
    RecordingModifier: {tag: a, start: 0, end: 4}
    Recorder: {tag: b, start: 2, update: 2}
  other_modifiers:
    RecordingModifier: {tag: c}
second_stage:
  more_modifiers:
    - RecordingModifier: {tag: d}
    - RecordingModifier: {tag: e, end: 9}
"""


def _signature(recipe):
    return [(type(m), m.model_dump(), m.group, m.index) for m in recipe.modifiers]


def test_stage_layout_keeps_every_stage_and_group_in_order():
    recipe = Recipe.from_yaml(STAGED)
    assert [s.name for s in recipe.stages] == ["first", "second"]
    assert [g.name for g in recipe.stages[0].groups] == ["record", "other"]
    assert [m.tag for m in recipe.modifiers] == ["a", "b", "c", "d", "e"]
    assert [m.index for m in recipe.modifiers] == [0, 1, 2, 3, 4]
    assert [m.group for m in recipe.modifiers] == ["record", "record", "other", "more", "more"]
    assert recipe.modifiers[1].update == 2


def test_flat_form():
    recipe = Recipe.from_yaml(
        "modifiers:\n  - Recorder: {tag: x, start: 1}\n  - RecordingModifier:\n"
    )
    assert [(m.tag, m.start) for m in recipe.modifiers] == [("x", 1), ("", None)]


@pytest.mark.parametrize("text", [STAGED, "modifiers:\n  - Recorder: {tag: x, start: 1.5}\n"])
def test_yaml_round_trip(text):
    recipe = Recipe.from_yaml(text)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert _signature(again) == _signature(recipe)
    assert again == recipe
    assert Recipe.from_yaml(again.to_yaml()).to_yaml() == recipe.to_yaml()


def test_from_modifiers_and_file(tmp_path):
    recipe = Recipe.from_modifiers([RecordingModifier(tag="z", start=3)])
    path = recipe.save(tmp_path / "recipe.yaml")
    assert Recipe.from_file(path) == recipe
    with pytest.raises(TypeError, match=r"modifiers\[1\] is a dict"):
        Recipe.from_modifiers([RecordingModifier(), {"RecordingModifier": {}}])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        Recipe.from_file(tmp_path / "nope.yaml")


def test_from_modifiers_puts_each_modifier_in_the_named_group():
    first, second = RecordingModifier(tag="a"), RecordingModifier(tag="b")
    recipe = Recipe.from_modifiers([first, second], stage="train", group="prune")
    assert [(m.group, m.index) for m in (first, second)] == [("prune", 0), ("prune", 1)]
    assert list(recipe.to_dict()) == ["train_stage"]
    assert list(recipe.to_dict()["train_stage"]) == ["prune_modifiers"]
    assert Recipe.from_modifiers([RecordingModifier()]).modifiers[0].group == "default"


@pytest.mark.parametrize(
    "other",
    [
        STAGED.replace("tag: e, end: 9", "tag: e, end: 8"),  # one argument
        STAGED.replace("second_stage", "third_stage"),  # a stage's name
        STAGED.replace("other_modifiers", "another_modifiers"),  # a group's name
        STAGED.replace("    - RecordingModifier: {tag: e, end: 9}\n", ""),  # one modifier fewer
        STAGED.replace("{tag: d}", "{tag: D}")
        .replace("{tag: e, end: 9}", "{tag: d}")
        .replace("{tag: D}", "{tag: e, end: 9}"),  # two modifiers in the other order
    ],
)
def test_recipes_that_differ_are_not_equal(other):
    """The round-trip tests rest on ``==``: it must see a change anywhere in a recipe."""
    recipe = Recipe.from_yaml(STAGED)
    changed = Recipe.from_yaml(other)
    assert changed != recipe
    assert recipe == Recipe.from_yaml(STAGED)


def test_a_recipe_equals_only_recipes():
    recipe = Recipe.from_yaml(STAGED)
    # Recorder is another name of RecordingModifier: the same recipe
    flat = "modifiers:\n  - {}: {{tag: x, start: 1}}\n"
    assert Recipe.from_yaml(flat.format("Recorder")) == Recipe.from_yaml(
        flat.format("RecordingModifier")
    )
    assert recipe != STAGED and recipe != recipe.to_dict()
    assert recipe.__eq__(STAGED) is NotImplemented


def test_repr_names_the_stages_and_the_modifiers():
    assert repr(Recipe.from_yaml(STAGED)) == (
        "Recipe(stages=['first', 'second'], modifiers=[RecordingModifier, RecordingModifier, "
        "RecordingModifier, RecordingModifier, RecordingModifier])"
    )


def test_unknown_modifier_lists_closest_names():
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml("s_stage:\n  g_modifiers:\n    RecordingModifer: {}\n")
    message = str(err.value)
    assert "s_stage -> g_modifiers -> RecordingModifer" in message
    assert "did you mean RecordingModifier" in message


def test_unknown_field_names_the_path_and_the_allowed_fields():
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml("s_stage:\n  g_modifiers:\n    RecordingModifier: {tga: x}\n")
    message = str(err.value)
    assert "s_stage -> g_modifiers -> RecordingModifier -> tga: unknown field" in message
    assert "tag" in message and "start" in message


def test_bad_value_names_the_path_the_value_and_what_was_expected():
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml("s_stage:\n  g_modifiers:\n    RecordingModifier: {start: soon}\n")
    message = str(err.value)
    assert "s_stage -> g_modifiers -> RecordingModifier -> start: got 'soon'" in message
    assert "number" in message


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "must be a mapping"),
        ("- a\n- b\n", "must be a mapping"),
        ("quant:\n  g_modifiers:\n    Recorder: {}\n", "top-level key 'quant' is not a stage"),
        ("s_stage:\n  groups:\n    Recorder: {}\n", "expected a '<group>_modifiers' key"),
        ("s_stage: 3\n", "a stage must map"),
        ("s_stage:\n  g_modifiers: []\n", "holds no modifiers"),
        ("s_stage:\n  g_modifiers:\n    Recorder: 5\n", "arguments must be a mapping"),
        ("s_stage:\n  g_modifiers:\n    Recorder: {index: 3}\n", "set by the recipe's layout"),
        ("s_stage:\n  g_modifiers:\n    Recorder: {group: h}\n", "group: set by the recipe's"),
        ("modifiers: []\nx_stage: {}\n", "not both"),
        ("modifiers:\n  - {A: 1, B: 2}\n", r"modifiers\[0\]: expected a mapping of one"),
        ("s_stage: {g_modifiers: {Recorder: {}}\n", "not valid YAML"),
    ],
)
def test_malformed_recipes(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_yaml(text)


def test_yaml_is_read_with_the_safe_loader():
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml("modifiers: !!python/object/apply:os.system ['echo hacked']\n")
