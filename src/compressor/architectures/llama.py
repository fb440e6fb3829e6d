"""Llama and the decoders whose layers name their modules as Llama's do: Mistral, Qwen2 and
Qwen3 (pre-norm RMSNorm blocks; grouped-query attention; a gated MLP)."""

from __future__ import annotations

from transformers import PretrainedConfig

from compressor.architectures.base import Architecture
from compressor.architectures.mappings import (
    NormMapping,
    SmoothingMapping,
    SpinQuantMapping,
    StructureMapping,
)

__all__ = ["ARCHITECTURE", "AWQ", "SMOOTHQUANT", "head_mappings", "row_mappings"]

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYERS = "model.layers"
BASE_LAYERS = "layers"

# modules of a decoder layer, relative to the layer
Q_PROJ = "self_attn.q_proj"
K_PROJ = "self_attn.k_proj"
V_PROJ = "self_attn.v_proj"
O_PROJ = "self_attn.o_proj"
GATE_PROJ = "mlp.gate_proj"
UP_PROJ = "mlp.up_proj"
DOWN_PROJ = "mlp.down_proj"
INPUT_NORM = "input_layernorm"
POST_ATTENTION_NORM = "post_attention_layernorm"
# modules outside the layers
EMBEDDING = "embed_tokens"
FINAL_NORM = "model.norm"
LM_HEAD = "lm_head"


def row_mappings(config: PretrainedConfig, blocks: str) -> list[StructureMapping]:
    """MLP neurons: rows of the gate and up projections with the down projection's columns.

    :param config: the model config
    :param blocks: dotted name of the decoder layers
    """
    return [
        StructureMapping(
            blocks=blocks,
            producers=[GATE_PROJ, UP_PROJ],
            consumers=[DOWN_PROJ],
            config={"intermediate_size": 1},
        )
    ]


def head_mappings(config: PretrainedConfig, blocks: str) -> list[StructureMapping]:
    """Whole key-value groups: one key-value head and the query heads that read it.

    Qwen3's ``q_norm`` and ``k_norm`` normalise each head over ``head_dim`` with one weight
    of ``head_dim`` values that every head shares, so removing heads leaves them unchanged.

    :param config: the model config (head counts)
    :param blocks: dotted name of the decoder layers
    :raises ValueError: when the key-value heads do not divide the query heads
    """
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if config.num_attention_heads % kv_heads:
        raise ValueError(
            f"num_attention_heads={config.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}"
        )
    return [
        StructureMapping(
            blocks=blocks,
            producers=[Q_PROJ, K_PROJ, V_PROJ],
            consumers=[O_PROJ],
            num_units=kv_heads,
            config={
                "num_key_value_heads": 1,
                "num_attention_heads": config.num_attention_heads // kv_heads,
            },
        )
    ]


def _anywhere(name: str) -> str:
    """A match string for every module whose dotted name ends in ``name``."""
    return f"re:.*{name}$"


SPINQUANT = SpinQuantMapping(
    embedding=_anywhere(EMBEDDING),
    attn_q=_anywhere(Q_PROJ),
    attn_k=_anywhere(K_PROJ),
    attn_v=_anywhere(V_PROJ),
    attn_o=_anywhere(O_PROJ),
    mlp_in=[_anywhere(UP_PROJ), _anywhere(GATE_PROJ)],
    mlp_out=[_anywhere(DOWN_PROJ)],
    lm_head=LM_HEAD,
)

# Qwen3's per-head q_norm/k_norm act after q_proj/k_proj, where neither R1 nor R2 reaches,
# so the pre-norm decoders share one set of norms to fuse.
NORMS = (
    NormMapping(
        norm=_anywhere(INPUT_NORM),
        linears=[_anywhere(Q_PROJ), _anywhere(K_PROJ), _anywhere(V_PROJ)],
    ),
    NormMapping(
        norm=_anywhere(POST_ATTENTION_NORM),
        linears=[_anywhere(UP_PROJ), _anywhere(GATE_PROJ)],
    ),
    NormMapping(norm=FINAL_NORM, linears=[LM_HEAD]),
)

# SmoothQuant smooths the two norms' outputs (the activations a W8A8 scheme quantizes first)
SMOOTHQUANT = (
    SmoothingMapping(
        smooth_layer=_anywhere(INPUT_NORM),
        balance_layers=[_anywhere(Q_PROJ), _anywhere(K_PROJ), _anywhere(V_PROJ)],
    ),
    SmoothingMapping(
        smooth_layer=_anywhere(POST_ATTENTION_NORM),
        balance_layers=[_anywhere(GATE_PROJ), _anywhere(UP_PROJ)],
    ),
)

# AWQ also moves scales between linears: v's rows to o's columns (only when v writes what o
# reads: not under grouped-query attention), up's rows to down's columns
AWQ = (
    SMOOTHQUANT[0],
    SmoothingMapping(smooth_layer=_anywhere(V_PROJ), balance_layers=[_anywhere(O_PROJ)]),
    SMOOTHQUANT[1],
    SmoothingMapping(smooth_layer=_anywhere(UP_PROJ), balance_layers=[_anywhere(DOWN_PROJ)]),
)

ARCHITECTURE = Architecture(
    family="llama",
    model_types=MODEL_TYPES,
    layers=LAYERS,
    base_layers=BASE_LAYERS,
    rows=row_mappings,
    heads=head_mappings,
    spinquant=SPINQUANT,
    norms=NORMS,
    smoothquant=SMOOTHQUANT,
    awq=AWQ,
)
