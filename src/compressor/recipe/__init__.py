"""Recipes in YAML, as dicts or as lists of modifiers."""

from compressor.recipe.recipe import Recipe, RecipeError, RecipeGroup, RecipeStage

__all__ = ["Recipe", "RecipeError", "RecipeGroup", "RecipeStage"]
