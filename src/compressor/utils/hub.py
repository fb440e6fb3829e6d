"""Whether a string has the form of a Hugging Face Hub repository id."""

from __future__ import annotations

import re

__all__ = ["has_hub_id_form"]

# 'name' or 'org/name', each part of letters, digits, '-', '_' and '.', starting alphanumeric
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def has_hub_id_form(name: str, *, file_suffixes: tuple[str, ...] = ()) -> bool:
    """``name`` is ``name`` or ``org/name`` (no ``..``) and ends in none of ``file_suffixes``
    (a string ending like a file is a path that does not exist, not a Hub id).

    :param name: the string a user passed
    :param file_suffixes: lower-case suffixes that mark a file name, e.g. ``(".gguf",)``
    """
    return (
        _HUB_ID.fullmatch(name) is not None
        and ".." not in name
        and not name.lower().endswith(file_suffixes)
    )
