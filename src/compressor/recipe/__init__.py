"""Recipes in YAML, as dicts or as lists of modifiers."""

from compressor.recipe.errors import RecipeError
from compressor.recipe.recipe import Recipe, RecipeGroup, RecipeStage
from compressor.recipe.resolve import resolve_recipe

__all__ = ["Recipe", "RecipeError", "RecipeGroup", "RecipeStage", "resolve_recipe"]
