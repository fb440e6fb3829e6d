"""Which of compressor's public API a case needs, and whether it is on this branch yet."""

from __future__ import annotations

import importlib
from typing import Any

from benchmarks.common import NotAvailable

# the public API the suites call, and the issue that brings each
API_ISSUES = {
    "compressor.oneshot": 9,
    "compressor.save_compressed": 3,
    "compressor.modifiers.QuantizationModifier": 3,
    "compressor.modifiers.GPTQModifier": 9,
    "compressor.modifiers.SpinQuantModifier": 10,
    "compressor.modifiers.SparsePruningModifier": 4,
    "compressor.modifiers.RowPruningModifier": 4,
    "compressor.modifiers.HeadPruningModifier": 4,
    "compressor.modifiers.LayerReductionModifier": 6,
    "compressor.CompressionCallback": 5,
}


def require(dotted: str) -> Any:
    """The object at ``dotted`` (``package.module.Name``), or NotAvailable naming its issue."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        issue = API_ISSUES.get(dotted)
        where = f" (issue {issue})" if issue else ""
        raise NotAvailable(f"{dotted} has not landed on this branch yet{where}") from None


def missing(requires: list[str] | tuple[str, ...]) -> str | None:
    """Why the API a case needs is not all here, or None when it is."""
    for dotted in requires:
        try:
            require(dotted)
        except NotAvailable as err:
            return str(err)
    return None
