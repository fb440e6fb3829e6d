"""Generated recipes thrown at the parser: each is valid, or refused with a ``RecipeError``
whose message names where (the recipe, a line, or a path of the input's keys); never
another exception. Valid ones round-trip through YAML."""

import re
from datetime import timedelta

import yaml
from compressed_tensors.quantization import QuantizationArgs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from compressor import Recipe, RecipeError
from compressor.architectures import NormMapping, SpinQuantMapping, StructureMapping
from compressor.modifiers.base import get_modifier_class, registered_modifiers

# fast and reproducible: a fixed set of examples, nothing written to the working directory
SETTINGS = settings(
    max_examples=100,
    deadline=timedelta(seconds=2),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

NAMES = registered_modifiers()
SPECIAL_TEXT = [
    "W4A16",
    "Linear",
    "lm_head",
    "re:.*mlp",
    "re:(a+)+",
    "re:((",
    "yes",
    "l1",
    "activation",
    "2:4",
    "R1",
    "angular",
    "index",
    "cubic",
]

# keys found in nested arguments (config groups, quantization args, mappings), so that the
# generated values often reach the validators of nested models
NESTED_KEYS = sorted(
    {"g", "targets", "weights", "input_activations", "output_activations"}
    | set(QuantizationArgs.model_fields)
    | set(SpinQuantMapping.model_fields)
    | set(NormMapping.model_fields)
    | set(StructureMapping.model_fields)
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(SPECIAL_TEXT)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-3, 3), children, max_size=4)
        | st.dictionaries(st.sampled_from(NESTED_KEYS), children, max_size=4)
    ),
    max_leaves=12,
)


plausible_leaf = (
    st.floats(-1, 2)
    | st.integers(-2, 10)
    | st.sampled_from(SPECIAL_TEXT)
    | st.lists(st.sampled_from(SPECIAL_TEXT) | st.integers(0, 3), max_size=3)
)
plausible = plausible_leaf | st.dictionaries(
    st.sampled_from(NESTED_KEYS), plausible_leaf | values, max_size=4
)


def _rarely(draw, usual, unusual):
    """``usual`` nine times in ten: most examples get past the layout to the fields."""
    return draw(unusual) if draw(st.integers(0, 9)) == 0 else draw(usual)


@st.composite
def modifier_args(draw, name):
    """Arguments for ``name``: its real fields (and some unknown ones) with random values."""
    try:
        fields = [f for f in get_modifier_class(name).model_fields if f not in ("index", "group")]
    except KeyError:
        fields = ["density"]
    keys = st.sampled_from(fields) | st.sampled_from(["sparsity", "bogus", "index"])
    return draw(st.dictionaries(keys, plausible | values, max_size=4))


@st.composite
def modifier_entries(draw):
    name = _rarely(draw, st.sampled_from(NAMES), st.sampled_from(["NoSuchModifier", ""]))
    return name, _rarely(draw, modifier_args(name), values)


@st.composite
def recipes(draw):
    """Recipe-shaped data (stage layout or flat list), now and then broken at one level."""
    entries = draw(st.lists(modifier_entries(), min_size=1, max_size=3))
    group: object = dict(entries) if draw(st.booleans()) else [{n: a} for n, a in entries]
    if draw(st.integers(0, 3)) == 0:
        return {"modifiers": group if isinstance(group, list) else [group]}
    group_key = _rarely(
        draw, st.sampled_from(["quant_modifiers", "pruning_modifiers"]), st.text(max_size=5)
    )
    stage_key = _rarely(draw, st.sampled_from(["quant_stage", "train_stage"]), st.text(max_size=5))
    stage = _rarely(draw, st.just({group_key: group}), values)
    return {stage_key: stage}


def _top_keys(data):
    return {str(k) for k in data} if isinstance(data, dict) else set()


def _names_a_place(message: str, top_keys: set[str]) -> bool:
    line = message
    if message.startswith("invalid recipe:\n  "):
        line = message.splitlines()[1].strip()
    if line.startswith(("recipe", "a recipe", "top-level key", "line ")):
        return True
    head = re.split(r" -> |: |\[", line, maxsplit=1)[0]
    return head in top_keys


def _check(parse, data, top_keys):
    try:
        recipe = parse(data)
    except RecipeError as err:
        message = str(err)
        assert _names_a_place(message, top_keys), message
        assert len(message) < 10_000
        return
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe


@SETTINGS
@given(recipes())
# cases found by this test (TypeErrors from validators; a NaN offset that never fires)
@example({"modifiers": [{"ConstantPruningModifier": {"targets": 0.0}}]})
@example({"q_stage": {"q_modifiers": {"GPTQModifier": {"config_groups": {"g": {}}, "targets": 5}}}})
@example({"modifiers": [{"SparsePruningModifier": {"density": 0.5, "start": float("nan")}}]})
def test_generated_recipe_dicts_are_valid_or_refused_with_the_place(data):
    _check(Recipe.from_dict, data, _top_keys(data))


@SETTINGS
@given(recipes() | values)
def test_generated_recipe_yaml_is_valid_or_refused_with_the_place(data):
    text = yaml.safe_dump(data, sort_keys=False)
    _check(Recipe.from_yaml, text, _top_keys(data))


@SETTINGS
@given(st.text(alphabet=st.sampled_from(list("ab:_-[]{},&*!|>'\"#\n ")), max_size=60))
def test_arbitrary_yaml_text_is_valid_or_refused_with_the_place(text):
    try:
        top_keys = _top_keys(yaml.safe_load(text))
    except yaml.YAMLError:
        top_keys = set()
    _check(Recipe.from_yaml, text, top_keys)
