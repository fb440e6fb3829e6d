"""Every form a recipe may be given in, turned into a ``Recipe``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from compressor.modifiers.base import Modifier
from compressor.recipe.recipe import Recipe

__all__ = ["recipe_from_str", "resolve_recipe"]


def resolve_recipe(recipe: Any) -> Recipe:
    """Accept a Recipe, a Modifier or a list of them, a dict, a ``pathlib.Path`` to YAML, or
    a string read by the rules of ``recipe_from_str``.

    :param recipe: the recipe in any of those forms
    :return: a Recipe whose modifiers have not run yet
    """
    if isinstance(recipe, Recipe):
        if any(m.initialized or m.finalized for m in recipe.modifiers):
            # a Recipe is configuration: reusing one (e.g. for a second oneshot) runs fresh
            # modifiers built from its recipe form, leaving the used ones as they ended
            logger.info("the recipe's modifiers already ran; using fresh ones built from it")
            return Recipe.from_yaml(recipe.to_yaml())
        return recipe
    if isinstance(recipe, Path):
        return Recipe.from_file(recipe)
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, Modifier):
        return Recipe.from_modifiers([recipe])
    if isinstance(recipe, Sequence) and not isinstance(recipe, str | bytes):
        return Recipe.from_modifiers(list(recipe))
    if isinstance(recipe, str):
        return recipe_from_str(recipe)
    raise TypeError(
        "recipe must be a Recipe, a list of Modifier objects, a dict, a pathlib.Path or a str "
        f"(a file's path or YAML text); got {type(recipe).__name__}"
    )


def recipe_from_str(text: str) -> Recipe:
    """A string as llm-compressor users pass it: the path of an existing file is that file,
    a string with a newline is YAML text, and anything else is refused with both readings
    shown (never guessed: a mistyped path must not parse as a YAML scalar, nor YAML as a path).

    :param text: a recipe file's path, or YAML text holding at least one newline
    :return: the parsed Recipe
    """
    if "\n" in text:
        return Recipe.from_yaml(text)
    if Path(text).is_file():
        return Recipe.from_file(Path(text))
    shown = text if len(text) <= 80 else text[:77] + "..."
    raise ValueError(
        f"recipe={shown!r} is neither of the two things a recipe string may be: as a path, no "
        f"file exists at {Path(text).absolute()}; as YAML text, it has no newline (a one-line "
        "string is never read as YAML). Pass an existing file's path, YAML text with its line "
        "breaks, or a pathlib.Path / Recipe.from_yaml(...) to say which you mean"
    )
