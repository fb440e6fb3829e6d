"""What a recipe may be: its size, its nesting and its YAML, checked before it is parsed.

A recipe is a few dozen values. These limits refuse, with an error that says which limit and
where, the inputs that would otherwise exhaust time or memory before any validation could
speak: a huge file, YAML aliases that expand a few hundred bytes into billions of values
("billion laughs"), nesting deep enough to overflow Python's stack, and duplicate keys (which
YAML loaders resolve by silently keeping the last one: a stage or a field would vanish).
PyYAML's safe loader still builds the values; ``load_recipe_yaml`` only adds the checks.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from compressor.recipe.errors import RecipeError
from compressor.utils.quote import quote

__all__ = [
    "MAX_RECIPE_BYTES",
    "MAX_RECIPE_DEPTH",
    "MAX_RECIPE_VALUES",
    "check_recipe_data",
    "check_recipe_size",
    "load_recipe_yaml",
]

#: recipe text above this size (UTF-8 bytes) is refused before parsing; real recipes are a
#: few kB, and the largest plausible one (an ``ignore`` list naming every expert of a large
#: mixture-of-experts model) stays well under it
MAX_RECIPE_BYTES = 1_000_000
#: values (scalars, lists and mappings) a recipe may hold once its YAML aliases are expanded
MAX_RECIPE_VALUES = 100_000
#: levels of nested lists and mappings (a recipe needs fewer than ten)
MAX_RECIPE_DEPTH = 64

_MERGE_TAG = "tag:yaml.org,2002:merge"


def check_recipe_size(size: int, what: str = "recipe") -> None:
    """Refuse recipe text of ``size`` bytes above ``MAX_RECIPE_BYTES``."""
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(
            f"{what}: {size:,} bytes, above the {MAX_RECIPE_BYTES:,}-byte limit for a recipe "
            "(compressor.recipe.limits.MAX_RECIPE_BYTES); a recipe lists modifiers and their "
            "arguments, not data"
        )


def load_recipe_yaml(text: str) -> Any:
    """``yaml.safe_load`` with the limits above checked, and duplicate keys refused.

    :raises RecipeError: naming the line (or the place) and the limit
    """
    check_recipe_size(len(text))
    check_recipe_size(len(text.encode("utf-8")))
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure_node(node, 0, {}, set())
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe is not valid YAML: {err}") from None
    finally:
        loader.dispose()


def check_recipe_data(data: Any) -> None:
    """Refuse recipe data (dicts, lists, scalars, as ``from_dict`` gets it) that holds more
    than ``MAX_RECIPE_VALUES`` values counting shared parts each time they appear, nests
    deeper than ``MAX_RECIPE_DEPTH``, or contains itself."""
    _measure_data(data, [], {}, set())


class _RecipeLoader(yaml.SafeLoader):
    """The safe loader, refusing nesting beyond ``MAX_RECIPE_DEPTH`` while it composes (its
    composer recurses once per level) and duplicate keys in a mapping."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._path: list[str] = []

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        if parent is not None:
            self._path.append(f"[{index}]" if isinstance(index, int) else _key_name(index))
        try:
            if len(self._path) > MAX_RECIPE_DEPTH:
                mark = self.peek_event().start_mark
                raise RecipeError(
                    f"{_place(self._path)} (line {mark.line + 1}): the recipe nests deeper than "
                    f"{MAX_RECIPE_DEPTH} levels of lists and mappings"
                )
            return super().compose_node(parent, index)
        finally:
            if parent is not None:
                self._path.pop()

    def compose_mapping_node(self, anchor: Any) -> MappingNode:
        node = super().compose_mapping_node(anchor)
        first: dict[Any, Any] = {}
        for key_node, _value in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node)
            try:
                earlier = first.setdefault(key, key_node)
            except TypeError:  # unhashable: the constructor refuses it with its own error
                continue
            if earlier is not key_node:
                raise RecipeError(
                    f"{_place(self._path)}: duplicate key {quote(key, 60)} at "
                    f"{_mark(key_node)} (first at {_mark(earlier)}); each key may appear once "
                    "in a mapping (YAML would keep only the last, silently)"
                )
        return node


def _mark(node: Node) -> str:
    return f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"


def _key_name(node: Any) -> str:
    return _step(node.value) if isinstance(node, ScalarNode) else "<key>"


def _step(key: Any) -> str:
    """A mapping key as a place in a path: plain when a short string, else quoted."""
    return key if isinstance(key, str) and 0 < len(key) <= 60 else quote(key, 60)


def _place(path: list[str]) -> str:
    if not path:
        return "recipe"
    shown = path if len(path) <= 8 else [*path[:4], "...", *path[-3:]]
    return " -> ".join(shown)


def _measure_node(
    node: Node, level: int, memo: dict[int, tuple[int, int]], open_: set[int]
) -> tuple[int, int]:
    """(values, height) of ``node`` with its aliases expanded; refused above the limits.
    Shared nodes (aliases) are measured once and counted every time they appear."""
    key = id(node)
    if key in memo:
        values, height = memo[key]
    elif key in open_:
        raise RecipeError(
            f"line {node.start_mark.line + 1}: an alias refers to a list or mapping that "
            "contains it (a recursive structure); a recipe must be a tree"
        )
    elif isinstance(node, ScalarNode):
        values, height = 1, 0
    else:
        open_.add(key)
        values, height = 1, 0
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        for child in children:
            child_values, child_height = _measure_node(child, level + 1, memo, open_)
            values += child_values
            height = max(height, child_height + 1)
            _check_values(values, f"line {node.start_mark.line + 1}")
        open_.discard(key)
        memo[key] = values, height
    if level + height > MAX_RECIPE_DEPTH:
        raise RecipeError(
            f"line {node.start_mark.line + 1}: with its aliases expanded the recipe nests deeper "
            f"than {MAX_RECIPE_DEPTH} levels of lists and mappings"
        )
    return values, height


def _measure_data(
    value: Any, path: list[str], memo: dict[int, tuple[int, int]], open_: set[int]
) -> tuple[int, int]:
    """(values, height) of ``value``, shared parts counted each time they appear; refused
    above the limits. Recursion stops at ``MAX_RECIPE_DEPTH``, far below Python's limit."""
    if not isinstance(value, dict | list | tuple):
        return 1, 0
    key = id(value)
    if key in open_:
        raise RecipeError(f"{_place(path)}: the recipe contains itself (a recursive structure)")
    if key in memo:
        values, height = memo[key]
    else:
        if len(path) >= MAX_RECIPE_DEPTH:
            raise RecipeError(
                f"{_place(path)}: the recipe nests deeper than {MAX_RECIPE_DEPTH} levels of "
                "lists and mappings"
            )
        open_.add(key)
        values, height = 1, 0
        is_dict = isinstance(value, dict)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for name, item in items:
            step = _step(name) if is_dict else f"[{name}]"
            item_values, item_height = _measure_data(item, [*path, step], memo, open_)
            values += item_values + (1 if is_dict else 0)
            height = max(height, item_height + 1)
            _check_values(values, _place(path))
        open_.discard(key)
        memo[key] = values, height
    if len(path) + height > MAX_RECIPE_DEPTH:
        raise RecipeError(
            f"{_place(path)}: the recipe nests deeper than {MAX_RECIPE_DEPTH} levels of lists "
            "and mappings"
        )
    return values, height


def _check_values(count: int, where: str) -> None:
    if count > MAX_RECIPE_VALUES:
        raise RecipeError(
            f"{where}: the recipe holds more than {MAX_RECIPE_VALUES:,} values (YAML aliases "
            "counted each time they are used); a recipe lists modifiers and their arguments"
        )
