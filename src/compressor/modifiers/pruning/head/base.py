"""HeadPruningModifier: whole attention heads (whole key-value groups under GQA)."""

from __future__ import annotations

import torch
from pydantic import Field

from compressor.modifiers.base import Modifier
from compressor.modifiers.pruning.coupling import Coupling
from compressor.modifiers.pruning.structured import StructuredPruningModifier

__all__ = ["HeadPruningModifier"]


@Modifier.register("HeadPruning")
class HeadPruningModifier(StructuredPruningModifier):
    """Prunes whole attention heads: their rows of the query, key and value projections and
    their input columns of the output projection (Michel et al., "Are Sixteen Heads Really
    Better than One?", 2019, arXiv:1905.10650).

    **Grouped-query attention**: the unit is a whole key-value group, that is one key-value
    head together with the ``num_attention_heads / num_key_value_heads`` query heads that
    read it. Every layer keeps the same number of groups, so after the clean-up
    ``num_key_value_heads`` is the kept group count and ``num_attention_heads`` that count
    times the group size, and the attention forward (which infers the head count from the
    projection width and keeps the group size) needs no change. ``density`` is therefore the
    fraction of key-value groups kept; with multi-head attention it is the fraction of heads.
    A key-value group's ``l1`` score is the summed magnitude of its q/k/v rows and o columns.

    **Lifecycle**: see ``StructuredPruningModifier``.

    :param density: the fraction of key-value groups (heads) kept in every layer
    :param num_heads: when set (DeepSpeed's ``num_heads``), the model's
        ``num_attention_heads`` must equal it, checked at initialize
    :param mappings: override; ``num_units`` is then the number of key-value heads, and it
        must divide every projection
    """

    kind = "heads"

    num_heads: int | None = Field(default=None, ge=1)

    def resolve_couplings(self, model: torch.nn.Module) -> list[Coupling]:
        heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
        if self.num_heads is not None and heads != self.num_heads:
            raise ValueError(
                f"HeadPruningModifier: num_heads={self.num_heads}, but the model has "
                f"num_attention_heads={heads}"
            )
        return super().resolve_couplings(model)
