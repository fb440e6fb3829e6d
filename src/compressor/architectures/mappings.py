"""Typed mappings that describe where things sit in a model, as data a recipe can also give.

``StructureMapping`` says which modules share a structured unit ("related modules"), for row,
head and channel pruning; ``SpinQuantMapping`` and ``NormMapping`` say which modules play which
role around the residual stream, for rotations and norm fusion; ``SmoothingMapping`` says which
module's output a per-channel scale divides and which linears it multiplies back (SmoothQuant,
AWQ). The per-architecture tables
fill them in; recipes may pass their own for architectures not listed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers import PretrainedConfig

from compressor.utils.patterns import MatchPattern

__all__ = [
    "Kind",
    "NormMapping",
    "SmoothingMapping",
    "SpinQuantMapping",
    "StructureBuilder",
    "StructureMapping",
]

#: the structured unit a mapping couples: MLP rows, attention heads or conv channels
Kind = Literal["rows", "heads", "channels"]


class StructureMapping(BaseModel):
    """Modules coupled through one kind of unit, in every block of ``blocks``.

    A mapping names, relative to each repeated block, the modules that *produce* the units
    (their output rows or channels, with biases and BatchNorm vectors) and the modules that
    *consume* them (their input columns or channels). Removing a unit removes it from all of
    them, so the pruned model computes exactly what the masked one did.

    :param blocks: dotted name of the ModuleList of repeated blocks; unset: the whole model
        is the one block (names are then full module names)
    :param producers: modules whose outputs are the units (Linear rows, Conv2d out channels)
    :param norms: BatchNorm layers over the units, between producer and consumer
    :param consumers: modules reading the units (Linear columns, Conv2d in channels)
    :param num_units: how many units (heads: key-value heads); unset: the first producer's
        output size (one unit per row or channel)
    :param config: model config keys to set to ``kept units * value`` after the clean-up
    :param attributes: ``"relative.module.attribute"`` set to ``kept units * value`` after the
        clean-up (for modules that store their own head counts)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    blocks: str | None = None
    producers: list[str] = Field(min_length=1)
    norms: list[str] = Field(default_factory=list)
    consumers: list[str] = Field(default_factory=list)
    num_units: int | None = Field(default=None, gt=0)
    config: dict[str, int] = Field(default_factory=dict)
    attributes: dict[str, int] = Field(default_factory=dict)


#: an architecture's mappings for one kind of unit, from the model config and the dotted
#: name of its blocks (which differs between a model with a task head and the bare base model)
StructureBuilder = Callable[[PretrainedConfig, str], list[StructureMapping]]


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


class SpinQuantMapping(BaseModel):
    """The modules R1 and R2 rotate, by role.

    Targets are compressed-tensors match strings (a module name, a class name or
    ``re:<regex>``).

    :param embedding: the token embedding (writes the residual stream)
    :param position_embedding: a learned position embedding added to the residual stream
        (OPT), rotated like the token embedding; None: the model has none (rotary models)
    :param attn_q: query projection (reads the residual stream)
    :param attn_k: key projection (reads the residual stream)
    :param attn_v: value projection (reads the residual stream; R2 on its output)
    :param attn_o: attention output projection (writes the residual; R2 on its input)
    :param mlp_in: MLP input projections (read the residual stream)
    :param mlp_out: MLP output projections (write the residual stream)
    :param lm_head: the output head (reads the residual stream)
    """

    model_config = ConfigDict(extra="forbid")

    embedding: MatchPattern
    position_embedding: MatchPattern | None = None
    attn_q: MatchPattern
    attn_k: MatchPattern
    attn_v: MatchPattern
    attn_o: MatchPattern
    mlp_in: list[MatchPattern] = Field(min_length=1)
    mlp_out: list[MatchPattern] = Field(min_length=1)
    lm_head: MatchPattern

    _wrap = field_validator("mlp_in", "mlp_out", mode="before")(_as_list)

    @property
    def embeddings(self) -> list[str]:
        """The embeddings whose rows start the residual stream (R1 on their output side)."""
        return [self.embedding, *([self.position_embedding] if self.position_embedding else [])]

    @property
    def residual_writers(self) -> list[str]:
        """Modules whose output lands on the residual stream (R1 on their output side)."""
        return [self.attn_o, *self.mlp_out]

    @property
    def residual_readers(self) -> list[str]:
        """Linears that read the residual stream (R1 on their input side)."""
        return [self.attn_q, self.attn_k, self.attn_v, *self.mlp_in, self.lm_head]


class NormMapping(BaseModel):
    """A normalisation layer and the linears that read its output.

    :param norm: the norm whose scale is fused into ``linears``
    :param linears: every linear fed by ``norm`` (one group per layer is matched)
    """

    model_config = ConfigDict(extra="forbid")

    norm: MatchPattern
    linears: list[MatchPattern] = Field(min_length=1)

    _wrap = field_validator("linears", mode="before")(_as_list)


class SmoothingMapping(BaseModel):
    """A module whose output channels a per-channel scale divides (the smooth layer) and the
    linears reading that output, whose input columns it multiplies (the balance layers), so
    the model computes the same function (SmoothQuant, AWQ).

    Written as llm-compressor writes them: a dict ``{smooth_layer, balance_layers}`` (its AWQ
    form) or a list ``[balance_layers, smooth_layer]`` (its SmoothQuant form). Targets are
    compressed-tensors match strings; in each decoder layer the balance layers closest to the
    smooth layer are matched with it.

    :param smooth_layer: a norm (its scale), or a linear (its output rows; when it writes
        more rows than the balance layers read, its last rows: v inside a fused qkv, up
        inside a fused gate_up)
    :param balance_layers: the linears reading the smooth layer's output
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    smooth_layer: str
    balance_layers: list[str] = Field(min_length=1)

    _wrap = field_validator("balance_layers", mode="before")(_as_list)

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            if len(value) != 2 or not isinstance(value[1], str):
                raise ValueError(
                    "a mapping given as a list must be [balance_layers, smooth_layer] "
                    f"(llm-compressor's SmoothQuant form), got {value!r}"
                )
            return {"balance_layers": value[0], "smooth_layer": value[1]}
        return value
