"""Where SpinQuant's rotations go in a model: typed mappings, inferred per architecture.

Targets are compressed-tensors match strings (a module name, a class name or ``re:<regex>``),
resolved with :func:`compressed_tensors.utils.match_named_modules`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "KNOWN_ARCHITECTURES",
    "NormMapping",
    "SpinQuantMapping",
    "infer_mapping_from_model",
    "infer_norm_mappings_from_model",
]


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


class SpinQuantMapping(BaseModel):
    """The modules R1 and R2 rotate, by role.

    :param embedding: the token embedding (writes the residual stream)
    :param attn_q: query projection (reads the residual stream)
    :param attn_k: key projection (reads the residual stream)
    :param attn_v: value projection (reads the residual stream; R2 on its output)
    :param attn_o: attention output projection (writes the residual; R2 on its input)
    :param mlp_in: MLP input projections (read the residual stream)
    :param mlp_out: MLP output projections (write the residual stream)
    :param lm_head: the output head (reads the residual stream)
    """

    model_config = ConfigDict(extra="forbid")

    embedding: str
    attn_q: str
    attn_k: str
    attn_v: str
    attn_o: str
    mlp_in: list[str] = Field(min_length=1)
    mlp_out: list[str] = Field(min_length=1)
    lm_head: str

    _wrap = field_validator("mlp_in", "mlp_out", mode="before")(_as_list)

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

    norm: str
    linears: list[str] = Field(min_length=1)

    _wrap = field_validator("linears", mode="before")(_as_list)


_DECODER_MAPPING = SpinQuantMapping(
    embedding="re:.*embed_tokens$",
    attn_q="re:.*self_attn.q_proj$",
    attn_k="re:.*self_attn.k_proj$",
    attn_v="re:.*self_attn.v_proj$",
    attn_o="re:.*self_attn.o_proj$",
    mlp_in=["re:.*mlp.up_proj$", "re:.*mlp.gate_proj$"],
    mlp_out=["re:.*mlp.down_proj$"],
    lm_head="lm_head",
)

_DECODER_NORMS = [
    NormMapping(
        norm="re:.*input_layernorm$",
        linears=["re:.*self_attn.q_proj$", "re:.*self_attn.k_proj$", "re:.*self_attn.v_proj$"],
    ),
    NormMapping(
        norm="re:.*post_attention_layernorm$",
        linears=["re:.*mlp.up_proj$", "re:.*mlp.gate_proj$"],
    ),
    NormMapping(norm="model.norm", linears=["lm_head"]),
]

# model_type -> (mapping, norm mappings); Llama-style pre-norm decoders share one layout.
# Qwen3's per-head q_norm/k_norm act after q_proj/k_proj, where neither R1 nor R2 reaches.
_MAPPINGS: dict[str, tuple[SpinQuantMapping, list[NormMapping]]] = {
    "llama": (_DECODER_MAPPING, _DECODER_NORMS),
    "mistral": (_DECODER_MAPPING, _DECODER_NORMS),
    "qwen2": (_DECODER_MAPPING, _DECODER_NORMS),
    "qwen3": (_DECODER_MAPPING, _DECODER_NORMS),
}
KNOWN_ARCHITECTURES = tuple(sorted(_MAPPINGS))


def _model_type(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _unknown(model: torch.nn.Module, field: str, kind: str) -> ValueError:
    return ValueError(
        f"SpinQuantModifier has no inferred {field} for {type(model).__name__} "
        f"(model_type={_model_type(model)!r}); known architectures: "
        f"{', '.join(KNOWN_ARCHITECTURES)}. Pass `{field}` explicitly ({kind})."
    )


def infer_mapping_from_model(model: torch.nn.Module) -> SpinQuantMapping:
    """The rotation mapping of a known architecture.

    :raises ValueError: for other architectures, saying to pass ``mappings``
    """
    entry = _MAPPINGS.get(_model_type(model) or "")
    if entry is None:
        raise _unknown(
            model,
            "mappings",
            "a SpinQuantMapping: embedding, attn_q, attn_k, attn_v, attn_o, mlp_in, mlp_out, "
            "lm_head",
        )
    return entry[0].model_copy(deep=True)


def infer_norm_mappings_from_model(model: torch.nn.Module) -> list[NormMapping]:
    """The norm -> linears mappings of a known architecture.

    :raises ValueError: for other architectures, saying to pass ``norm_mappings``
    """
    entry = _MAPPINGS.get(_model_type(model) or "")
    if entry is None:
        raise _unknown(model, "norm_mappings", "a list of NormMapping: norm, linears")
    return [mapping.model_copy(deep=True) for mapping in entry[1]]
