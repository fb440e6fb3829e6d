"""OPT: decoder layers under ``model.decoder``; pre-norm LayerNorm blocks with biases, learned
position embeddings added to the residual stream, a ReLU MLP (``fc1``, ``fc2``)."""

from __future__ import annotations

from compressor.architectures.base import Architecture
from compressor.architectures.mappings import NormMapping, SpinQuantMapping

__all__ = ["ARCHITECTURE"]

_LAYER = r"re:.*layers\.\d+\."

# R1 writers: both embeddings, out_proj and fc2; readers: q, k, v, fc1 and lm_head. OPT's
# LayerNorms centre their input, which SpinQuant handles by centring every residual writer
# (spinquant/centring.py) before the rotations.
SPINQUANT = SpinQuantMapping(
    embedding=r"re:.*embed_tokens$",
    position_embedding=r"re:.*embed_positions$",
    attn_q=_LAYER + r"self_attn\.q_proj$",
    attn_k=_LAYER + r"self_attn\.k_proj$",
    attn_v=_LAYER + r"self_attn\.v_proj$",
    attn_o=_LAYER + r"self_attn\.out_proj$",
    mlp_in=[_LAYER + r"fc1$"],
    mlp_out=[_LAYER + r"fc2$"],
    lm_head="lm_head",
)

# a layer's `final_layer_norm` feeds its MLP; the decoder's own feeds the head
NORMS = (
    NormMapping(
        norm=_LAYER + r"self_attn_layer_norm$",
        linears=[
            _LAYER + r"self_attn\.q_proj$",
            _LAYER + r"self_attn\.k_proj$",
            _LAYER + r"self_attn\.v_proj$",
        ],
    ),
    NormMapping(norm=_LAYER + r"final_layer_norm$", linears=[_LAYER + r"fc1$"]),
    NormMapping(norm=r"re:.*decoder\.final_layer_norm$", linears=["lm_head"]),
)

ARCHITECTURE = Architecture(
    family="opt",
    model_types=("opt",),
    layers="model.decoder.layers",
    base_layers="decoder.layers",
    spinquant=SPINQUANT,
    norms=NORMS,
)
