"""The architecture tables against tiny models of every listed model type: each path and
mapping names modules the model has."""

import pytest
import torch
from compressed_tensors.utils import match_named_modules
from transformers import AutoConfig, AutoModelForCausalLM, BertForMaskedLM

from compressor.architectures import (
    ARCHITECTURES,
    BY_MODEL_TYPE,
    architecture_for,
    find_decoder_layers_path,
    known_model_types,
)

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
EXTRA = {
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "gpt2": dict(n_inner=64),
    # mixture-of-experts families: few, narrow experts
    "mixtral": dict(num_local_experts=4),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=32),
    "olmoe": dict(num_experts=4),
    "deepseek_v3": dict(
        n_routed_experts=4,
        moe_intermediate_size=32,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    ),
}


def _tiny(model_type):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SMALL, **EXTRA.get(model_type, {}))
    if model_type == "bert":
        return BertForMaskedLM(config).eval()
    return AutoModelForCausalLM.from_config(config).eval()


def test_every_model_type_has_one_table():
    listed = [t for a in ARCHITECTURES for t in a.model_types]
    assert len(listed) == len(set(listed)) == len(BY_MODEL_TYPE)


@pytest.mark.parametrize("model_type", sorted(BY_MODEL_TYPE))
def test_the_table_names_modules_the_model_has(model_type):
    model = _tiny(model_type)
    architecture = architecture_for(model)
    assert model_type in architecture.model_types
    # the layers, with and without the task head
    assert find_decoder_layers_path(model) == architecture.layers
    assert find_decoder_layers_path(model.base_model) == architecture.base_layers
    layers = model.get_submodule(architecture.layers)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 2
    # every module a structure mapping couples, in every layer, with whole units
    for builder in (architecture.rows, architecture.heads):
        if builder is None:
            continue
        for mapping in builder(model.config, architecture.layers):
            for layer in layers:
                names = mapping.producers + mapping.norms + mapping.consumers
                for name in names:
                    weight = layer.get_submodule(name).weight
                    size = weight.shape[1 if name in mapping.consumers else 0]
                    assert size % (mapping.num_units or size) == 0
                for path in mapping.attributes:
                    module_path, _, attribute = path.rpartition(".")
                    assert hasattr(layer.get_submodule(module_path), attribute)
    # every SpinQuant role and norm matches a module (once per layer inside the layers)
    if architecture.spinquant is not None:
        roles = architecture.spinquant.residual_readers + architecture.spinquant.residual_writers
        for target in [*architecture.spinquant.embeddings, *roles]:
            assert list(match_named_modules(model, [target])), target
    for norm in architecture.norms:
        for target in [norm.norm, *norm.linears]:
            assert list(match_named_modules(model, [target])), target


def test_an_unknown_model_type_names_itself_and_the_known_ones():
    model = _tiny("gpt2")
    with pytest.raises(ValueError, match=r"no rows mapping for GPT2LMHeadModel") as err:
        architecture_for(model, needs="rows")
    assert "model_type='gpt2'" in str(err.value)
    assert "known architectures: bert, llama, mistral, qwen2, qwen3" in str(err.value)
    with pytest.raises(
        ValueError, match=r"model_type=None.*known architectures: bert, deepseek_v3, gemma"
    ):
        architecture_for(torch.nn.Linear(2, 2))
    assert known_model_types("spinquant") == ["llama", "mistral", "opt", "qwen2", "qwen3"]
    assert architecture_for(model).family == "gpt2"
