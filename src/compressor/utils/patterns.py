"""Module-name patterns from recipes (``targets``, ``ignore``, mappings), checked when parsed.

A recipe's ``re:<regex>`` strings are matched against every module name of a model with
Python's backtracking ``re`` engine (compressed-tensors' matcher). A regex that nests a
quantifier inside a quantified group, such as ``re:^(([a-z_.0-9])+)+X$``, can take time
exponential in the name's length to fail, and a model has thousands of names: the run hangs.
``check_match_pattern`` refuses such patterns when the recipe is parsed, without a dependency:
it reads the parse tree of Python's own regex compiler (the same tree ``re.compile`` builds)
and refuses a repeated part (``*``, ``+``, ``{m,n}`` with n > 1) that holds another repeat or
an alternation of several branches, the two shapes that let a backtracking engine split one
name in exponentially many ways. Single characters in an alternation (``(q|k|v)``) compile to
a character set and are fine. This refuses some harmless patterns too (``(\\d+\\.)+``); the
error says how to write them flat.

``MatchPattern`` is the pydantic type every recipe field holding such patterns uses.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator

from compressor.utils.quote import quote

try:  # Python 3.11+
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["MatchPattern", "check_match_pattern"]

REGEX_PREFIX = "re:"

_REPEATS = {
    _sre_parse.MAX_REPEAT,
    _sre_parse.MIN_REPEAT,
    *([_sre_parse.POSSESSIVE_REPEAT] if hasattr(_sre_parse, "POSSESSIVE_REPEAT") else []),
}


def check_match_pattern(pattern: str) -> str:
    """Return ``pattern`` when it is a plain name or a safe ``re:`` regex.

    :raises ValueError: naming the pattern, when its regex does not compile or nests a
        quantifier (or an alternation) inside a quantified group
    """
    if not pattern.startswith(REGEX_PREFIX):
        return pattern
    regex = pattern[len(REGEX_PREFIX) :]
    try:
        tree = _sre_parse.parse(regex)
    except (re.error, OverflowError, RecursionError) as err:
        raise ValueError(f"{quote(pattern)} is not a valid regular expression: {err}") from None
    problem = _nested_repeat(tree, inside=False)
    if problem is not None:
        raise ValueError(
            f"{quote(pattern)} has {problem} inside a repeated group, which can take time "
            "exponential in a module name's length to match (catastrophic backtracking); "
            "write it without repeating a group that itself repeats or branches, for example "
            "'re:.*mlp$' rather than 're:(\\w+\\.)+mlp$'"
        )
    return pattern


def _nested_repeat(tree: Any, inside: bool) -> str | None:
    """The first repeat or alternation found inside a repeat, described; else None."""
    for op, av in tree:
        if op in _REPEATS:
            _low, high, body = av
            repeats = high > 1
            if repeats and inside:
                return "a quantifier"
            found = _nested_repeat(body, inside or repeats)
        elif op is _sre_parse.BRANCH:
            if inside and len(av[1]) > 1:
                return "an alternation"
            found = _first(_nested_repeat(branch, inside) for branch in av[1])
        elif op is _sre_parse.SUBPATTERN:
            found = _nested_repeat(av[-1], inside)
        elif op in (_sre_parse.ASSERT, _sre_parse.ASSERT_NOT):
            found = _nested_repeat(av[1], inside)
        elif op is getattr(_sre_parse, "ATOMIC_GROUP", None):
            found = _nested_repeat(av, inside)
        elif op is _sre_parse.GROUPREF_EXISTS:
            found = _first(_nested_repeat(p, inside) for p in av[1:] if p is not None)
        else:
            found = None
        if found is not None:
            return found
    return None


def _first(found: Any) -> str | None:
    return next((f for f in found if f is not None), None)


#: a module name, a class name or a ``re:`` regex, checked by ``check_match_pattern``
MatchPattern = Annotated[str, AfterValidator(check_match_pattern)]
