"""The part of row, head and channel pruning that is shared: mappings, masks per unit and the
clean-up at finalize."""

from __future__ import annotations

from typing import ClassVar

import torch
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator

from compressor.core import State
from compressor.modifiers.pruning.base import PruningModifierBase
from compressor.modifiers.pruning.groups import PruneGroup
from compressor.modifiers.pruning.mappings import (
    Kind,
    StructureMapping,
    build_groups,
    default_mappings,
)
from compressor.modifiers.pruning.related import check_related_modules, related_mappings
from compressor.modifiers.pruning.schedule import kept_count
from compressor.modifiers.pruning.surgery import check_config, shrink_groups

__all__ = ["StructuredPruningModifier"]


class StructuredPruningModifier(PruningModifierBase):
    """Prunes whole units (rows, heads, channels) shared by coupled modules; every layer keeps
    the same number, so the model config can describe the result.

    **Lifecycle**: as ``PruningModifierBase``; then at ``on_finalize``, with ``shrink``, the
    pruned units are removed from every coupled module and the config is updated.

    :param mappings: coupled modules, overriding the architecture's built-in mapping
    :param shrink: physically remove the pruned units at finalize (else they stay zeros and
        ``compressor.modifiers.pruning.removal.remove_pruned_structure`` can remove them later)
    :param related_modules: the modules coupled to the pruned units, as names, ``re:``
        patterns or class names (DeepSpeed's ``related_modules``). Checked at initialize
        against the mapping: each pattern must match modules coupled to the pruned units and
        reach every pruned group, and every module whose inputs shrink must be named. Where
        no mapping is known (no ``mappings``, no built-in one), they define it (rows and
        channels): the i-th target in model order is coupled with the i-th match of each
        pattern, BatchNorm as norms, the rest as readers
    """

    kind: ClassVar[Kind]

    mappings: list[StructureMapping] | None = None
    shrink: bool = True
    related_modules: list[str] | None = Field(default=None, min_length=1)

    _removed: dict[str, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _density_required(self) -> StructuredPruningModifier:
        if self.density is None:
            raise ValueError("density (or sparsity) is required")
        return self

    def describe(self) -> str:
        """The modifier and its recipe group, for errors."""
        group = f" (recipe group {self.group!r})" if self.group else ""
        return f"{type(self).__name__}{group}"

    def structure_mappings(self, model: torch.nn.Module) -> list[StructureMapping]:
        """``mappings``, else the architecture's, else those ``related_modules`` define."""
        if self.mappings is not None:
            return self.mappings
        try:
            return default_mappings(model, self.kind)
        except ValueError:
            if self.related_modules is None:
                raise
        return related_mappings(
            model, self.kind, self.targets, self.ignore, self.related_modules, self.describe()
        )

    def check_related(self, model: torch.nn.Module, groups: list[PruneGroup]) -> None:
        """Check ``related_modules`` (when given) against the groups' coupling."""
        if self.related_modules is not None and groups:
            check_related_modules(model, groups, self.related_modules, self.describe())

    def resolve_groups(self, model: torch.nn.Module) -> list[PruneGroup]:
        mappings = self.structure_mappings(model)
        groups = build_groups(model, mappings, self.targets, self.ignore)
        self.check_related(model, groups)
        if self.shrink:
            every = build_groups(model, mappings)
            described = [g for g in every if g.config]
            chosen = {g.name for g in groups}
            left_out = [g.name for g in described if g.name not in chosen]
            if left_out and len(left_out) < len(described):
                keys = sorted({k for g in described for k in g.config})
                raise ValueError(
                    f"{type(self).__name__}: targets/ignore leave out {left_out}, but the config "
                    f"describes every layer with one {', '.join(keys)}; prune them all to the "
                    "same density, or set shrink: false to keep the pruned units as zeros"
                )
            # the config must accept the final counts: fail now, not after training
            final = self.final_density()
            assert final is not None
            values = {
                key: kept_count(g.n_units or 1, final) * scale
                for g in groups
                for key, scale in g.config.items()
            }
            check_config(getattr(model, "config", None), values, type(model).__name__)
        return groups

    def on_finalize(self, state: State) -> None:
        super().on_finalize(state)
        if not self.shrink:
            return
        keep = [self._unit_masks.get(i) for i in range(len(self._groups))]
        if any(mask is None for mask in keep):
            logger.warning("{}: nothing was pruned, nothing to remove", type(self).__name__)
            return
        assert self._holder is not None
        self._holder.clear()
        self._removed = shrink_groups(state.model, self._groups, keep)  # type: ignore[arg-type]
        if any(g.attributes and not g.config for g in self._groups):
            logger.warning(
                "{}: the modules now hold fewer units, but {} cannot describe that (it derives "
                "the unit size from other fields); the model runs, from_pretrained will not "
                "reload it",
                type(self).__name__,
                type(getattr(state.model, "config", None)).__name__,
            )
