"""The part of row, head and channel pruning that is shared: mappings, masks per unit and the
clean-up at finalize."""

from __future__ import annotations

from typing import ClassVar

import torch
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator

from compressor.core import State
from compressor.modifiers.pruning.base import PruningModifierBase
from compressor.modifiers.pruning.coupling import Coupling
from compressor.modifiers.pruning.mappings import (
    Kind,
    StructureMapping,
    build_couplings,
    default_mappings,
)
from compressor.modifiers.pruning.related import check_related_modules, related_mappings
from compressor.modifiers.pruning.schedule import kept_count
from compressor.modifiers.pruning.surgery import check_config, shrink_couplings
from compressor.utils.patterns import MatchPattern

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
        reach every pruned coupling, and every module whose inputs shrink must be named. Where
        no mapping is known (no ``mappings``, no built-in one), they define it (rows and
        channels): the i-th target in model order is coupled with the i-th match of each
        pattern, BatchNorm as norms, the rest as readers
    """

    kind: ClassVar[Kind]

    mappings: list[StructureMapping] | None = None
    shrink: bool = True
    related_modules: list[MatchPattern] | None = Field(default=None, min_length=1)

    _removed: dict[str, int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _density_required(self) -> StructuredPruningModifier:
        if self.density is None:
            raise ValueError("density (or sparsity) is required")
        return self

    def describe(self) -> str:
        """The modifier and its recipe group, for errors."""
        recipe_group = f" (recipe group {self.group!r})" if self.group else ""
        return f"{type(self).__name__}{recipe_group}"

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

    def check_related(self, model: torch.nn.Module, couplings: list[Coupling]) -> None:
        """Check ``related_modules`` (when given) against ``couplings``."""
        if self.related_modules is not None and couplings:
            check_related_modules(model, couplings, self.related_modules, self.describe())

    def resolve_couplings(self, model: torch.nn.Module) -> list[Coupling]:
        mappings = self.structure_mappings(model)
        couplings = build_couplings(model, mappings, self.targets, self.ignore)
        self.check_related(model, couplings)
        if self.shrink:
            every = build_couplings(model, mappings)
            described = [c for c in every if c.config]
            chosen = {c.name for c in couplings}
            left_out = [c.name for c in described if c.name not in chosen]
            if left_out and len(left_out) < len(described):
                keys = sorted({k for c in described for k in c.config})
                raise ValueError(
                    f"{type(self).__name__}: targets/ignore leave out {left_out}, but the config "
                    f"describes every layer with one {', '.join(keys)}; prune them all to the "
                    "same density, or set shrink: false to keep the pruned units as zeros"
                )
            # the config must accept the final counts: fail now, not after training
            final = self.final_density()
            assert final is not None
            values = {
                key: kept_count(c.n_units or 1, final) * scale
                for c in couplings
                for key, scale in c.config.items()
            }
            check_config(getattr(model, "config", None), values, type(model).__name__)
        return couplings

    def on_finalize(self, state: State) -> None:
        super().on_finalize(state)
        if not self.shrink:
            return
        keep = [self._masks.get(i) for i in range(len(self._couplings))]
        if any(mask is None for mask in keep):
            logger.warning("{}: nothing was pruned, nothing to remove", type(self).__name__)
            return
        assert self._holder is not None
        self._holder.clear()
        self._removed = shrink_couplings(state.model, self._couplings, keep)  # type: ignore[arg-type]
        if any(c.attributes and not c.config for c in self._couplings):
            logger.warning(
                "{}: the modules now hold fewer units, but {} cannot describe that (it derives "
                "the unit size from other fields); the model runs, from_pretrained will not "
                "reload it",
                type(self).__name__,
                type(getattr(state.model, "config", None)).__name__,
            )
