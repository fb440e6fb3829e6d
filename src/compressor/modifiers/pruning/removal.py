"""Turn structured pruning into a smaller model: ``remove_pruned_structure(model)``."""

from __future__ import annotations

import torch
from loguru import logger

from compressor.modifiers.pruning.mappings import (
    ARCHITECTURES,
    Kind,
    StructureMapping,
    build_couplings,
    default_mappings,
    sequential_conv_mappings,
)
from compressor.modifiers.pruning.surgery import pruned_units, shrink_couplings

__all__ = ["remove_pruned_structure"]


def _kinds(model: torch.nn.Module) -> list[Kind]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ["rows", "heads"]
    try:
        sequential_conv_mappings(model)
    except ValueError:
        raise ValueError(
            f"no structure mapping for {type(model).__name__} (model_type={model_type!r}); "
            f"known architectures: {', '.join(sorted(ARCHITECTURES))} and plain nn.Sequential "
            "conv nets. Pass mappings={'rows': [StructureMapping(...)], ...}"
        ) from None
    return ["channels"]


@torch.no_grad()
def remove_pruned_structure(
    model: torch.nn.Module, mappings: dict[str, list[StructureMapping]] | None = None
) -> dict[str, int]:
    """Physically remove every pruned unit (rows, heads, channels whose weights in all coupled
    modules are exactly zero) and update the model config.

    Layers keep the same number of units: where one layer has more zero units than another,
    the extra zero units stay (they compute nothing), so one config value describes all.

    :param model: a model pruned by the structured pruning modifiers (masks already removed)
    :param mappings: coupled modules per kind (``rows``, ``heads``, ``channels``); unset:
        the architecture's built-in mappings
    :return: the config values that were set
    """
    if mappings is None:
        chosen = {kind: default_mappings(model, kind) for kind in _kinds(model)}
    else:
        chosen = dict(mappings)
    values: dict[str, int] = {}
    for kind, kind_mappings in chosen.items():
        for mapping in kind_mappings:
            couplings = build_couplings(model, [mapping])
            if not couplings:
                continue
            pruned = [pruned_units(g) for g in couplings]
            keep_count = max(int((~p).sum()) for p in pruned)
            if keep_count == couplings[0].n_units:
                continue
            keep = []
            for p in pruned:
                mask = ~p
                extra = keep_count - int(mask.sum())
                if extra:  # keep some zero units so every layer has the same count
                    mask[p.nonzero().flatten()[:extra]] = True
                keep.append(mask)
            logger.info(
                "{}: {} of {} units kept per coupling", kind, keep_count, couplings[0].n_units
            )
            values.update(shrink_couplings(model, couplings, keep))
    return values
