"""The mixture-of-experts decoders' smoothing mappings (SmoothQuant, AWQ): Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE and DeepSeek-V3.

The mappings name the experts as the compressing modifiers unfold them: one Linear per expert
and projection under the family's checkpoint names (``moe.MOE_LAYOUTS``:
``mlp.experts.<i>.gate_proj``, Mixtral's ``mlp.experts.<i>.w1``). In a sparse block the
post-attention norm's output is read by every routed expert's gate and up projections, the
shared experts' and the router, so one scale divides it and multiplies all their columns.
The router is not named here: the smoothing modifiers add the router (and Qwen's shared-expert
gate) of every sparse block whose experts a mapping balances, so the routing logits, and with
them every routing decision, stay what they were. Each expert's up projection smooths into its
own down projection (AWQ), one mapping per expert, as a Llama MLP's up into its down.

Patterns not tied to ``experts`` (``gate_proj$``) also match the MLPs of dense layers and the
shared experts, so a stack mixing dense and sparse layers (DeepSeek's
``first_k_dense_replace``, Qwen's ``mlp_only_layers``) is covered by the same mappings.
"""

from __future__ import annotations

from compressor.architectures import llama
from compressor.architectures.base import Architecture
from compressor.architectures.mappings import SmoothingMapping

__all__ = ["DEEPSEEK_V3", "MIXTRAL", "QWEN_MOE"]

_INPUT_NORM = "re:.*input_layernorm$"
_POST_ATTENTION_NORM = "re:.*post_attention_layernorm$"
_V_TO_O = llama.AWQ[1]


def _mlp(gate: str, up: str, down: str) -> tuple[SmoothingMapping, SmoothingMapping]:
    """The post-attention norm into every gate and up projection; each up into its down."""
    return (
        SmoothingMapping(smooth_layer=_POST_ATTENTION_NORM, balance_layers=[gate, up]),
        SmoothingMapping(smooth_layer=up, balance_layers=[down]),
    )


# Mixtral's experts are ``w1`` (gate), ``w3`` (up), ``w2`` (down); it has no dense MLP
_MIXTRAL_MLP = _mlp(r"re:.*experts\.\d+\.w1$", r"re:.*experts\.\d+\.w3$", r"re:.*experts\.\d+\.w2$")
MIXTRAL = Architecture(
    family="mixtral",
    model_types=("mixtral",),
    layers=llama.LAYERS,
    base_layers=llama.BASE_LAYERS,
    smoothquant=(llama.SMOOTHQUANT[0], _MIXTRAL_MLP[0]),
    awq=(llama.SMOOTHQUANT[0], _V_TO_O, *_MIXTRAL_MLP),
)

# Llama's attention; routed experts, shared experts and dense MLPs all name gate/up/down_proj
_QWEN_MLP = _mlp("re:.*gate_proj$", "re:.*up_proj$", "re:.*down_proj$")
QWEN_MOE = Architecture(
    family="qwen_moe",
    model_types=("qwen2_moe", "qwen3_moe", "olmoe"),
    layers=llama.LAYERS,
    base_layers=llama.BASE_LAYERS,
    smoothquant=(llama.SMOOTHQUANT[0], _QWEN_MLP[0]),
    awq=(llama.SMOOTHQUANT[0], _V_TO_O, *_QWEN_MLP),
)

# multi-head latent attention: the input norm feeds the query (or its low-rank ``q_a_proj``)
# and the joint key-value down projection; the low-rank norms feed the up projections. Values
# leave ``kv_b_proj`` interleaved with keys per head, so no scale moves into ``o_proj``. A
# model without a query low rank has no ``q_a_layernorm``: that mapping is then skipped
_MLA_INPUT = SmoothingMapping(
    smooth_layer=_INPUT_NORM,
    balance_layers=[r"re:.*self_attn\.(q|q_a)_proj$", r"re:.*self_attn\.kv_a_proj_with_mqa$"],
)
DEEPSEEK_V3 = Architecture(
    family="deepseek_v3",
    model_types=("deepseek_v3",),
    layers=llama.LAYERS,
    base_layers=llama.BASE_LAYERS,
    smoothquant=(_MLA_INPUT, _QWEN_MLP[0]),
    awq=(
        _MLA_INPUT,
        SmoothingMapping(smooth_layer="re:.*q_a_layernorm$", balance_layers=["re:.*q_b_proj$"]),
        SmoothingMapping(smooth_layer="re:.*kv_a_layernorm$", balance_layers=["re:.*kv_b_proj$"]),
        *_QWEN_MLP,
    ),
)
