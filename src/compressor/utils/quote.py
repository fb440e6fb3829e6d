"""A bounded ``repr`` for error messages that quote user input."""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["QUOTE_LIMIT", "quote"]

#: at most this many characters of an offending value appear in an error message
QUOTE_LIMIT = 200

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 6
_REPR.maxstring = _REPR.maxother = 100


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters, without building the whole repr first:
    a recipe can hold a structure whose full repr (its aliases expanded) is gigabytes."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a value whose repr fails still gets a message
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
