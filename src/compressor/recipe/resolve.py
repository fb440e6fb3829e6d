"""Every form a recipe may be given in, turned into a ``Recipe``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from compressor.modifiers.base import Modifier
from compressor.recipe.recipe import Recipe

__all__ = ["resolve_recipe"]


def resolve_recipe(recipe: Any) -> Recipe:
    """Accept a Recipe, a Modifier or a list of them, a dict, or a ``pathlib.Path`` to YAML.

    A string is refused: it is never guessed to be a path or YAML text.
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
        raise TypeError(
            "recipe is a str: pass pathlib.Path(...) for a YAML file or Recipe.from_yaml(text) "
            "for YAML text (a string is never guessed to be one or the other)"
        )
    raise TypeError(
        "recipe must be a Recipe, a list of Modifier objects, a dict or a pathlib.Path; "
        f"got {type(recipe).__name__}"
    )
