"""``Architecture``: everything the library knows of one family of model architectures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compressor.architectures.mappings import (
    NormMapping,
    SmoothingMapping,
    SpinQuantMapping,
    StructureBuilder,
)

__all__ = ["Architecture", "Feature"]

#: what a caller needs from a table: a field of ``Architecture`` that must be set
Feature = Literal["rows", "heads", "spinquant", "norms", "smoothquant", "awq"]


@dataclass(frozen=True)
class Architecture:
    """One family of transformers architectures whose blocks name their modules alike.

    :param family: a short name for the family, for errors and logs
    :param model_types: the ``config.model_type`` values of the family
    :param layers: dotted name of the ModuleList of repeated blocks in a model with a task
        head (``...ForCausalLM``)
    :param base_layers: the same in the bare base model (no task head)
    :param rows: the MLP row mappings (rows with the coupled input columns); None: the
        library cannot prune rows of this family
    :param heads: the attention-head mappings (whole key-value groups); None: no head pruning
    :param spinquant: the modules SpinQuant rotates, by role; None: no inferred rotations
    :param norms: each norm and the linears reading its output (whose scale is fused into
        them before a rotation)
    """

    family: str
    model_types: tuple[str, ...]
    layers: str
    base_layers: str
    rows: StructureBuilder | None = None
    heads: StructureBuilder | None = None
    spinquant: SpinQuantMapping | None = None
    norms: tuple[NormMapping, ...] = ()
    smoothquant: tuple[SmoothingMapping, ...] = ()
    awq: tuple[SmoothingMapping, ...] = ()
    norm_weight_offset: float = 0.0

    def has(self, feature: Feature) -> bool:
        """Whether the table holds ``feature``."""
        return bool(getattr(self, feature))
