"""The error every recipe and config parser raises."""

from __future__ import annotations

__all__ = ["RecipeError"]


class RecipeError(ValueError):
    """A recipe that cannot be parsed; the message names where and what was expected."""
