"""SpinQuant's R3: a Hadamard per head on queries and keys after RoPE; exact in full precision,
composed with a quantized key/value cache (which then holds rotated keys), and a warning when
no cache is quantized."""

import math

import pytest
import torch
from datasets import Dataset
from loguru import logger
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from compressor import oneshot
from compressor.modifiers import QuantizationModifier, SpinQuantModifier
from conftest import tiny_llama_config

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
KV8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}


def _llama(**overrides):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def _qwen2():
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def _data():
    return Dataset.from_dict({"input_ids": [row.tolist() for row in IDS]})


@pytest.fixture
def warnings():
    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    yield messages
    logger.remove(handle)


@pytest.mark.parametrize("build", [_llama, _qwen2])
@pytest.mark.parametrize("rotations", [["R3"], ["R1", "R2", "R3", "R4"]])
def test_r3_leaves_the_model_unchanged_with_and_without_a_cache(build, rotations, warnings):
    model = build()
    with torch.no_grad():
        reference = model(IDS).logits
    generated = model.generate(IDS[:1, :5], max_new_tokens=8, do_sample=False)
    oneshot(model=model, recipe=[SpinQuantModifier(rotations=rotations)])
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference, atol=1e-4, rtol=0)
    # generation goes through the cache: the keys stored there are rotated, the queries too
    assert torch.equal(model.generate(IDS[:1, :5], max_new_tokens=8, do_sample=False), generated)
    attention = model.model.layers[0].self_attn
    assert attention.R3_q_attn.weight.shape == (8, 8)
    scheme = model.transform_config.config_groups["R3"]
    assert [a.location for a in scheme.apply] == ["q_attn", "k_cache"] and scheme.head_dim == 8
    assert any("no kv_cache_scheme quantizes this model's cache: R3 changes nothing" in m
               for m in warnings)  # fmt: skip


def _keys_seen_by_the_cache_quantizer(model):
    seen = []
    for layer in model.model.layers:
        layer.self_attn.kv_cache.register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].detach().clone())
        )
    with torch.no_grad():
        model(IDS)
    return seen


def test_the_quantized_cache_receives_rotated_keys(warnings):
    plain, rotated = _llama(), _llama()
    with torch.no_grad():  # an outlier channel in the keys
        for model in (plain, rotated):
            model.model.layers[0].self_attn.k_proj.weight[3] *= 30
    kv = QuantizationModifier(kv_cache_scheme=KV8)
    oneshot(model=plain, recipe=[kv.model_copy()], dataset=_data())
    oneshot(model=rotated, recipe=[SpinQuantModifier(rotations=["R3"]), kv], dataset=_data())
    assert not any("R3 changes nothing" in m for m in warnings)
    keys, rotated_keys = (_keys_seen_by_the_cache_quantizer(m) for m in (plain, rotated))
    hadamard = rotated.model.layers[0].self_attn.R3_k_cache.weight / math.sqrt(8)
    torch.testing.assert_close(rotated_keys[0], keys[0] @ hadamard, atol=1e-5, rtol=1e-5)
    # the rotation spreads the outlier: a smaller calibrated key scale for the same keys
    assert rotated.model.layers[0].self_attn.k_scale < plain.model.layers[0].self_attn.k_scale / 2


def test_r3_with_a_head_size_without_hadamard_is_refused():
    model = _llama(hidden_size=40, num_attention_heads=4, num_key_value_heads=2)  # head 10
    with pytest.raises(ValueError, match=r"R3 \(head_dim 10\).*no Hadamard matrix of order 10"):
        oneshot(model=model, recipe=[SpinQuantModifier(rotations=["R3"])])
