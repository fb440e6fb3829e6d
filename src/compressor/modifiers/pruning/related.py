"""Related modules named by a recipe (DeepSpeed's ``related_modules``): checked against the
coupling a structure mapping gives, or paired with the targets where no mapping is known.

A structured unit is removed from its producers and from the modules that read it. A recipe
that names those readers itself (DeepSpeed's configs do) must agree with the mapping we
prune by, or the pruned model would differ from what its author expects.
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import is_match
from loguru import logger

from compressor.architectures import BATCH_NORMS
from compressor.modifiers.pruning.coupling import Coupling
from compressor.modifiers.pruning.mappings import Kind, StructureMapping

__all__ = ["check_related_modules", "match_related", "related_mappings"]

_MEMBER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, *BATCH_NORMS)


def match_related(model: torch.nn.Module, pattern: str) -> list[str]:
    """Names of the Linear, Conv2d and BatchNorm modules ``pattern`` matches (a name, a
    ``re:`` pattern or a class name), in model order; containers are never related."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, _MEMBER_TYPES) and is_match(name, module, pattern)
    ]


def check_related_modules(
    model: torch.nn.Module, couplings: list[Coupling], patterns: list[str], where: str
) -> None:
    """Raise ValueError unless ``patterns`` agree with ``couplings``.

    Every pattern must match a module of the model; every module it matches must be coupled
    to a pruned coupling (a producer, norm or reader of its units), and it must reach every
    pruned coupling; every module whose inputs the mapping shrinks must be named by a pattern.

    :param where: names the modifier and its recipe group in the errors
    """
    coupled = {m.name: c for c in couplings for m in c.members}
    named: set[str] = set()
    for pattern in patterns:
        names = match_related(model, pattern)
        if not names:
            raise ValueError(
                f"{where}: related_modules pattern {pattern!r} matches no Linear, Conv2d or "
                "BatchNorm module of the model"
            )
        stray = [n for n in names if n not in coupled]
        if stray:
            example = couplings[0]
            raise ValueError(
                f"{where}: related_modules pattern {pattern!r} matches {_few(stray)}, which the "
                "structure mapping does not couple to any pruned unit (it couples, for "
                f"example, {example.name} with {_few([m.name for m in example.members[1:]])}); "
                "fix the pattern, or pass mappings for this model"
            )
        reached = {coupled[n].name for n in names}
        missed = [c.name for c in couplings if c.name not in reached]
        if missed:
            raise ValueError(
                f"{where}: related_modules pattern {pattern!r} matches nothing coupled to the "
                f"pruned {_few(missed)}; every pruned coupling needs its related modules"
            )
        named.update(names)
    for coupling in couplings:
        unnamed = [m.name for m in coupling.members if m.dim == 1 and m.name not in named]
        if unnamed:
            raise ValueError(
                f"{where}: the structure mapping also shrinks the inputs of {_few(unnamed)} "
                f"with {coupling.name}, but no related_modules pattern names them (patterns: "
                f"{patterns}); add them, or pass mappings that leave them out"
            )
    logger.info("{}: related_modules {} agree with the structure mapping", where, patterns)


def related_mappings(
    model: torch.nn.Module,
    kind: Kind,
    targets: list[str] | None,
    ignore: list[str],
    patterns: list[str],
    where: str,
) -> list[StructureMapping]:
    """Mappings from the targets and their related modules, for a model without a built-in
    mapping: as DeepSpeed pairs them, the i-th target (in model order) with the i-th module
    each pattern matches; BatchNorm modules become norms, the others readers of the units.

    :raises ValueError: for heads (which projections produce the heads and which read them
        cannot be told from names), without targets, or when the counts differ
    """
    if kind == "heads":
        raise ValueError(
            f"{where}: related_modules cannot define a heads mapping (producers and readers of "
            "a head cannot be told apart by name); pass mappings for this model"
        )
    if not targets:
        raise ValueError(f"{where}: related_modules are paired with the targets; set targets")
    producers = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
        and is_match(name, module, targets)
        and not (ignore and is_match(name, module, ignore))
    ]
    if not producers:
        raise ValueError(f"{where}: targets {targets} match no Linear or Conv2d module")
    related = {pattern: match_related(model, pattern) for pattern in patterns}
    for pattern, names in related.items():
        if not names:
            raise ValueError(
                f"{where}: related_modules pattern {pattern!r} matches no Linear, Conv2d or "
                "BatchNorm module of the model"
            )
        if len(names) != len(producers):
            raise ValueError(
                f"{where}: related_modules pattern {pattern!r} matches {len(names)} module(s) "
                f"({_few(names)}), but the targets match {len(producers)} "
                f"({_few(producers)}); they are paired in model order, so the counts must agree"
            )
    mappings = []
    for index, producer in enumerate(producers):
        modules = [(names[index], model.get_submodule(names[index])) for names in related.values()]
        mappings.append(
            StructureMapping(
                producers=[producer],
                norms=[n for n, m in modules if isinstance(m, BATCH_NORMS)],
                consumers=[n for n, m in modules if not isinstance(m, BATCH_NORMS)],
            )
        )
    logger.info(
        "{}: no built-in {} mapping; coupled from related_modules: {}",
        where,
        kind,
        [(m.producers[0], m.norms + m.consumers) for m in mappings],
    )
    return mappings


def _few(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
