"""Tiny mixture-of-experts models of the transformers 5 families, built from configs.

Every family gets 8 experts routed top-2, hidden 32 and expert width 32 (group size 16
divides both), two decoder layers, so a test runs in seconds on a CPU.
"""

from __future__ import annotations

import torch

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    num_experts_per_tok=2,
)


def tiny_moe_config(family: str, **overrides):
    """The config of a tiny model of ``family`` (one of ``MOE_FAMILIES``, ``olmoe``,
    ``qwen3_next``, ``gpt_oss``)."""
    import transformers

    values = dict(_COMMON)
    if family == "mixtral":
        values.update(intermediate_size=32, num_local_experts=8)
        cls = transformers.MixtralConfig
    elif family == "qwen2_moe":
        values.update(
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_experts=8,
        )
        cls = transformers.Qwen2MoeConfig
    elif family == "qwen3_moe":
        values.update(intermediate_size=64, moe_intermediate_size=32, num_experts=8, head_dim=8)
        cls = transformers.Qwen3MoeConfig
    elif family == "olmoe":
        values.update(intermediate_size=32, num_experts=8)
        cls = transformers.OlmoeConfig
    elif family == "deepseek_v3":
        values.update(
            intermediate_size=64,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        )
        cls = transformers.DeepseekV3Config
    elif family == "gpt_oss":
        values.update(intermediate_size=32, num_local_experts=8, head_dim=8)
        cls = transformers.GptOssConfig
    else:
        raise ValueError(f"no tiny config for {family!r}")
    values.update(overrides)
    return cls(**values)


def tiny_moe(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of ``family``, in eval mode, float32.

    The router weights are drawn larger than the default initialisation so that routing
    is decided by the input (a zero-initialised router sends every token to the same
    experts)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(family, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and param.dim() == 2:
                param.normal_(0.0, 0.5)
            elif param.dim() == 3:
                param.normal_(0.0, 0.1)
    return model.eval()
