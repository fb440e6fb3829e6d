"""Recipes: YAML <-> Recipe <-> modifiers.

Grammar (the stage layout llm-compressor users write)::

    <name>_stage:
      <group>_modifiers:
        ModifierName: {arg: value, ...}

or, for short recipes, a flat list::

    modifiers:
      - ModifierName: {arg: value}

Every stage is kept, in order. A group may also be a list of one-key mappings, which allows
the same modifier twice in one group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from loguru import logger
from pydantic import ValidationError

from compressor.modifiers.base import Modifier, UnknownModifierError, get_modifier_class
from compressor.recipe.deepspeed.convert import deepspeed_modifiers
from compressor.recipe.errors import RecipeError
from compressor.recipe.limits import (
    check_recipe_data,
    check_recipe_size,
    load_recipe_yaml,
)
from compressor.recipe.llmcompressor import (
    check_llmcompressor_fields,
    gptq_args_from_earlier,
    split_llmcompressor_fields,
    wants_earlier_scheme,
)
from compressor.utils.quote import quote

__all__ = ["Recipe", "RecipeError", "RecipeGroup", "RecipeStage"]

STAGE_SUFFIX = "_stage"
GROUP_SUFFIX = "_modifiers"
FLAT_KEY = "modifiers"
DEFAULT_STAGE = "default"
DEFAULT_GROUP = "default"
# llm-compressor's stage key naming the entry point a stage was written for; 0.14 reads and
# ignores it, and here too each modifier's schedule (start or none) says when it runs
RUN_TYPE_KEY = "run_type"
RUN_TYPES = ("oneshot", "train")


@dataclass
class RecipeGroup:
    name: str
    modifiers: list[Modifier] = field(default_factory=list)


@dataclass
class RecipeStage:
    name: str
    groups: list[RecipeGroup] = field(default_factory=list)

    @property
    def modifiers(self) -> list[Modifier]:
        return [m for group in self.groups for m in group.modifiers]


class Recipe:
    """An ordered list of stages, each holding groups of modifiers.

    Build one with ``from_yaml`` (text), ``from_file`` (a path), ``from_dict`` or
    ``from_modifiers``; ``to_yaml`` writes it back so that it re-parses to equal modifiers.
    """

    def __init__(self, stages: Sequence[RecipeStage]) -> None:
        self.stages = list(stages)
        for index, modifier in enumerate(self.modifiers):
            modifier.index = index

    # ---------------------------------------------------------------- reading
    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        """Parse YAML text (PyYAML's safe loader), refusing text above
        ``compressor.recipe.limits.MAX_RECIPE_BYTES``, aliases that expand beyond
        ``MAX_RECIPE_VALUES``, nesting beyond ``MAX_RECIPE_DEPTH`` and duplicate keys."""
        if not isinstance(text, str):
            raise TypeError(f"Recipe.from_yaml takes YAML text (a str), got {type(text).__name__}")
        return cls.from_dict(load_recipe_yaml(text))

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """Read a YAML recipe file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        try:
            check_recipe_size(path.stat().st_size)
            return cls.from_yaml(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise RecipeError(
                f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"
            ) from None
        except RecipeError as err:
            raise RecipeError(f"{path}: {err}") from err

    @classmethod
    def from_modifiers(
        cls,
        modifiers: Iterable[Modifier],
        stage: str = DEFAULT_STAGE,
        group: str = DEFAULT_GROUP,
    ) -> Recipe:
        """Wrap modifier objects in a one-stage, one-group recipe."""
        modifiers = list(modifiers)
        for position, modifier in enumerate(modifiers):
            if not isinstance(modifier, Modifier):
                raise TypeError(
                    f"modifiers[{position}] is a {type(modifier).__name__}, expected a Modifier"
                )
            modifier.group = group
        return cls([RecipeStage(stage, [RecipeGroup(group, modifiers)])])

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        """Parse the dict form of a recipe (what ``yaml.safe_load`` returns); data larger or
        deeper than ``compressor.recipe.limits`` allows is refused first."""
        check_recipe_data(data)
        if not isinstance(data, dict) or not data:
            raise RecipeError(
                "a recipe must be a mapping with '<name>_stage' keys or a 'modifiers' list; "
                f"got {_describe(data)}"
            )
        if FLAT_KEY in data:
            if len(data) > 1:
                others = sorted(k for k in data if k != FLAT_KEY)
                raise RecipeError(
                    f"a recipe has either a 'modifiers' list or stages, not both; also found {others}"
                )
            context = _ParseContext()
            group = _parse_group(data[FLAT_KEY], [FLAT_KEY], DEFAULT_GROUP, context)
            return cls(_without_empty([RecipeStage(DEFAULT_STAGE, [group])]))
        stages = []
        context = _ParseContext()
        for key, body in data.items():
            if not isinstance(key, str) or not key.endswith(STAGE_SUFFIX):
                raise RecipeError(
                    f"top-level key {key!r} is not a stage: expected '<name>{STAGE_SUFFIX}' "
                    f"keys or a single '{FLAT_KEY}' list"
                )
            stages.append(_parse_stage(key, body, context))
        return cls(_without_empty(stages))

    @classmethod
    def from_deepspeed(cls, config: Any) -> Recipe:
        """Convert a DeepSpeed ``compression_training`` config (a dict, a JSON path, or a
        whole DeepSpeed config holding that key); see ``compressor.recipe.deepspeed.convert``.
        """
        groups: list[RecipeGroup] = []
        for modifier in deepspeed_modifiers(config):
            name = modifier.group or DEFAULT_GROUP
            if not groups or groups[-1].name != name:
                groups.append(RecipeGroup(name))
            groups[-1].modifiers.append(modifier)
        return cls([RecipeStage(DEFAULT_STAGE, groups)])

    # ---------------------------------------------------------------- writing
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for stage in self.stages:
            groups: dict[str, Any] = {}
            for group in stage.groups:
                entries = [{type(m).__name__: m.recipe_args()} for m in group.modifiers]
                names = [next(iter(e)) for e in entries]
                if len(set(names)) == len(names):
                    groups[group.name + GROUP_SUFFIX] = {
                        k: v for e in entries for k, v in e.items()
                    }
                else:
                    groups[group.name + GROUP_SUFFIX] = entries
            out[stage.name + STAGE_SUFFIX] = groups
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    # ---------------------------------------------------------------- access
    @property
    def modifiers(self) -> list[Modifier]:
        return [m for stage in self.stages for m in stage.modifiers]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Recipe):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        names = ", ".join(type(m).__name__ for m in self.modifiers)
        return f"Recipe(stages={[s.name for s in self.stages]}, modifiers=[{names}])"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {quote(value, 120)}"


@dataclass
class _ParseContext:
    """What parsing a modifier may need from those before it: the last quantizing modifier
    and the group list holding it (a GPTQModifier without a scheme takes its place)."""

    last_quantizer: Modifier | None = None
    last_quantizer_list: list[Modifier] | None = None


def _without_empty(stages: list[RecipeStage]) -> list[RecipeStage]:
    """Drop groups (and stages) left empty when a GPTQModifier took over the modifier before
    it; a recipe as written has none (an empty group is an error)."""
    out = []
    for stage in stages:
        stage.groups = [g for g in stage.groups if g.modifiers]
        if stage.groups:
            out.append(stage)
    return out


def _parse_stage(key: str, body: Any, context: _ParseContext) -> RecipeStage:
    name = key[: -len(STAGE_SUFFIX)]
    if not isinstance(body, dict) or not body:
        raise RecipeError(
            f"{key}: a stage must map '<group>{GROUP_SUFFIX}' keys to modifiers; got {_describe(body)}"
        )
    groups = []
    for group_key, group_body in body.items():
        if group_key == RUN_TYPE_KEY:
            _check_run_type(key, group_body)
            continue
        if not isinstance(group_key, str) or not group_key.endswith(GROUP_SUFFIX):
            raise RecipeError(
                f"{key} -> {group_key!r}: expected a '<group>{GROUP_SUFFIX}' key inside a stage"
            )
        group_name = group_key[: -len(GROUP_SUFFIX)]
        groups.append(_parse_group(group_body, [key, group_key], group_name, context))
    if not groups:
        raise RecipeError(f"{key}: the stage holds no '<group>{GROUP_SUFFIX}' keys")
    return RecipeStage(name, groups)


def _check_run_type(stage: str, value: Any) -> None:
    if value not in RUN_TYPES:
        raise RecipeError(
            f"{stage} -> {RUN_TYPE_KEY}: got {_describe(value)}; expected one of {list(RUN_TYPES)}"
        )
    logger.info(
        "{} -> {}: {!r} has no effect (llm-compressor 0.14 ignores it too): each modifier runs "
        "when its schedule says, post-training without start, in training with one",
        stage,
        RUN_TYPE_KEY,
        value,
    )


def _parse_group(body: Any, path: list[str], group: str, context: _ParseContext) -> RecipeGroup:
    where = " -> ".join(path)
    if isinstance(body, dict):
        entries = list(body.items())
    elif isinstance(body, list):
        entries = []
        for position, item in enumerate(body):
            if not isinstance(item, dict) or len(item) != 1:
                raise RecipeError(
                    f"{where}[{position}]: expected a mapping of one modifier name to its "
                    f"arguments, got {_describe(item)}"
                )
            entries.append(next(iter(item.items())))
    else:
        raise RecipeError(
            f"{where}: expected a mapping of modifier names to arguments (or a list of such "
            f"mappings); got {_describe(body)}"
        )
    if not entries:
        raise RecipeError(f"{where}: the group holds no modifiers")
    modifiers: list[Modifier] = []
    for name, args in entries:
        modifier = _build_modifier(name, args, f"{where} -> {name}", group, context)
        modifiers.append(modifier)
        if hasattr(modifier, "resolve_quantization_config"):
            context.last_quantizer, context.last_quantizer_list = modifier, modifiers
    return RecipeGroup(group, modifiers)


def _build_modifier(
    name: Any, args: Any, where: str, group: str, context: _ParseContext | None = None
) -> Modifier:
    if not isinstance(name, str):
        raise RecipeError(f"{where}: a modifier name must be a string, got {_describe(name)}")
    try:
        modifier_cls = get_modifier_class(name)
    except UnknownModifierError as err:
        raise RecipeError(f"{where}: {err}") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RecipeError(f"{where}: arguments must be a mapping, got {_describe(args)}")
    for reserved in ("index", "group"):
        if reserved in args:
            raise RecipeError(f"{where} -> {reserved}: set by the recipe's layout, not an argument")
    args, theirs = split_llmcompressor_fields(modifier_cls, args)
    if context is not None and wants_earlier_scheme(modifier_cls, args):
        try:
            args = gptq_args_from_earlier(context.last_quantizer, args, where)
        except ValueError as err:
            raise RecipeError(str(err)) from None
        assert context.last_quantizer_list is not None
        context.last_quantizer_list.remove(context.last_quantizer)  # type: ignore[arg-type]
        context.last_quantizer = None
    try:
        modifier = modifier_cls.model_validate(args)
    except ValidationError as err:
        raise RecipeError(_format_validation(err, where, modifier_cls)) from None
    try:
        check_llmcompressor_fields(modifier, theirs, where)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    modifier.group = group
    return modifier


#: problems listed per invalid modifier, and characters of each (a message quotes the input)
_MAX_PROBLEMS = 10
_MAX_PROBLEM_CHARS = 600


def _format_validation(err: ValidationError, where: str, modifier_cls: type[Modifier]) -> str:
    lines = []
    problems = err.errors(include_url=False, include_context=False)
    for problem in problems[:_MAX_PROBLEMS]:
        field_path = " -> ".join(
            quote(part, 60) if not isinstance(part, str | int) else str(part)
            for part in problem["loc"]
        )
        target = f"{where} -> {field_path}" if field_path else where
        if problem["type"] == "extra_forbidden":
            allowed = ", ".join(
                n for n, f in modifier_cls.model_fields.items() if n not in ("index", "group")
            )
            line = f"{target}: unknown field; {modifier_cls.__name__} accepts: {allowed}"
        else:
            line = f"{target}: got {quote(problem.get('input'))}; {problem['msg']}"
        if len(line) > _MAX_PROBLEM_CHARS:
            line = line[: _MAX_PROBLEM_CHARS - 3] + "..."
        lines.append(line)
    if len(problems) > _MAX_PROBLEMS:
        lines.append(f"... and {len(problems) - _MAX_PROBLEMS} more problem(s)")
    return "invalid recipe:\n  " + "\n  ".join(lines)
