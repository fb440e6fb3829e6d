"""kv_cache_scheme: calibrated key/value scales on the attention modules, the quantized cache
in the forward, the compressed-tensors checkpoint and its reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from compressor import create_session, oneshot, save_compressed
from compressor.entrypoints.loading import load_model
from compressor.modifiers import GPTQModifier, QuantizationModifier
from compressor.modifiers.quantization.kv_cache import KVCacheQuantizer, kv_range
from compressor.utils.eval import perplexity
from conftest import tiny_bert, tiny_llama_config

FP8_TENSOR = {
    "num_bits": 8,
    "type": "float",
    "strategy": "tensor",
    "dynamic": False,
    "symmetric": True,
}
INT8_HEAD = {
    "num_bits": 8,
    "type": "int",
    "strategy": "attn_head",
    "dynamic": False,
    "symmetric": True,
}


def _tiny_qwen():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return Qwen2ForCausalLM(config).eval()


def _calibrate(model, modifier, batches):
    with create_session() as session:
        session.initialize(model, [modifier])
        session.calibration_epoch_start()
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        session.calibration_epoch_end()
        session.finalize()
    return model


def _observed_keys_and_values(model, batches):
    """What each attention module's k_proj/v_proj write, after the rotary embedding: read
    from a plain model by recording what the cache receives."""
    from transformers import DynamicCache

    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    original = DynamicCache.update

    def record(self, key_states, value_states, layer_idx, *args, **kwargs):
        seen.setdefault(layer_idx, []).append((key_states.detach(), value_states.detach()))
        return original(self, key_states, value_states, layer_idx, *args, **kwargs)

    DynamicCache.update = record
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch, use_cache=True)
    finally:
        DynamicCache.update = original
    return seen


@pytest.mark.parametrize("build", ["llama", "qwen"])
def test_fp8_scales_are_the_largest_key_and_value_over_448(build, token_batches):
    model = LlamaForCausalLM(tiny_llama_config()).eval() if build == "llama" else _tiny_qwen()
    seen = _observed_keys_and_values(copy.deepcopy(model), token_batches)
    _calibrate(model, QuantizationModifier(kv_cache_scheme=FP8_TENSOR), token_batches)
    for index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        keys = torch.stack([k.abs().max() for k, _ in seen[index]]).max()
        values = torch.stack([v.abs().max() for _, v in seen[index]]).max()
        # later layers calibrate behind the earlier layers' quantized cache, as they will run
        tolerance = 1e-5 if index == 0 else 1e-2
        assert torch.allclose(attention.k_scale, keys / 448.0, rtol=tolerance)
        assert torch.allclose(attention.v_scale, values / 448.0, rtol=tolerance)
        assert isinstance(attention.kv_cache, KVCacheQuantizer)


def test_per_head_int8_scales_and_the_cache_holds_int8_grid_values(tiny_llama, token_batches):
    _calibrate(tiny_llama, QuantizationModifier(kv_cache_scheme=INT8_HEAD), token_batches)
    attention = tiny_llama.model.layers[1].self_attn
    assert attention.k_scale.shape == (2, 1, 1)  # one per key-value head
    assert attention.k_scale[0].item() != attention.k_scale[1].item()
    from transformers import DynamicCache

    cache = DynamicCache(config=tiny_llama.config)
    with torch.no_grad():
        tiny_llama(**token_batches[0], cache=cache, use_cache=True)
    keys = cache.layers[1].keys  # what the real cache stored: quantized keys
    codes = keys / attention.k_scale
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.abs().max() <= 127.5


def test_the_quantized_cache_changes_the_output_and_perplexity_measures_it(
    tiny_llama, token_batches
):
    reference = copy.deepcopy(tiny_llama)
    ids = torch.cat([b["input_ids"] for b in token_batches])
    coarse = {**INT8_HEAD, "num_bits": 8}
    _calibrate(tiny_llama, QuantizationModifier(kv_cache_scheme=coarse), token_batches)
    with torch.no_grad():
        got, expected = tiny_llama(ids).logits, reference(ids).logits
    assert 0 < (got - expected).abs().max().item() < 0.05 * expected.abs().max().item()
    quantized = perplexity(tiny_llama, ids.flatten(), window=16)
    plain = perplexity(reference, ids.flatten(), window=16)
    assert quantized != plain


@pytest.mark.parametrize("kv", [FP8_TENSOR, INT8_HEAD])
@pytest.mark.parametrize("scheme", [None, "FP8"])
def test_checkpoint_carries_the_scales_and_reloads_with_equal_logits(
    tmp_path, token_batches, kv, scheme
):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    kwargs = {"scheme": scheme} if scheme else {}
    _calibrate(model, QuantizationModifier(kv_cache_scheme=kv, **kwargs), token_batches)
    ids = token_batches[0]["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits
    save_compressed(model, tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    for i in range(2):
        attention = model.model.layers[i].self_attn
        assert torch.equal(tensors[f"model.layers.{i}.self_attn.k_scale"], attention.k_scale.data)
        assert torch.equal(tensors[f"model.layers.{i}.self_attn.v_scale"], attention.v_scale.data)
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["kv_cache_scheme"]["strategy"] == kv["strategy"]
    assert saved["kv_cache_scheme"]["type"] == kv["type"]
    reloaded = load_model(tmp_path / "q", compressed_ok=True)
    for i in range(2):
        assert torch.equal(
            reloaded.model.layers[i].self_attn.k_scale, model.model.layers[i].self_attn.k_scale
        )
    with torch.no_grad():
        got = reloaded(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_gptq_with_a_kv_cache_through_oneshot_reloads_equal(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    data = Dataset.from_dict({"input_ids": torch.randint(0, 128, (8, 24))})
    groups = {"g": {"weights": {"num_bits": 4, "group_size": 16}}}
    modifier = GPTQModifier(config_groups=groups, kv_cache_scheme=FP8_TENSOR)
    model = oneshot(model, [modifier], data, output_dir=tmp_path / "out")
    assert model.model.layers[1].self_attn.k_scale.item() > 0
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
        got = load_model(tmp_path / "out", compressed_ok=True)(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_plain_transformers_reload_drops_the_scales_which_load_model_restores(
    tmp_path, token_batches
):
    """compressed-tensors 0.20 hooks only forwards taking past_key_values; transformers 5.24's
    take ``cache``. If a later compressed-tensors hooks them itself, load_model leaves them."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    _calibrate(model, QuantizationModifier(kv_cache_scheme=FP8_TENSOR), token_batches)
    save_compressed(model, tmp_path / "q")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert not hasattr(plain.model.layers[0].self_attn, "k_scale")


def test_an_attention_we_cannot_hook_is_an_error_at_initialize_naming_it():
    model = tiny_bert()  # BertSelfAttention: query/key/value, no cache argument
    with (
        pytest.raises(ValueError, match=r"kv_cache_scheme: .*(Bert|no attention module)"),
        create_session() as session,
    ):
        session.initialize(model, [QuantizationModifier(kv_cache_scheme=FP8_TENSOR)])


def test_kv_range_per_head_reduces_all_but_the_head_dimension():
    states = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    from compressed_tensors.quantization import QuantizationArgs

    lo, hi = kv_range(states, QuantizationArgs(**INT8_HEAD))
    assert torch.equal(hi, states.transpose(0, 1).flatten(1).amax(1))
    assert torch.equal(lo, states.transpose(0, 1).flatten(1).amin(1))


@pytest.mark.parametrize(
    ("kv", "match"),
    [
        ({**FP8_TENSOR, "num_bits": 4}, "num_bits 8"),
        ({**FP8_TENSOR, "dynamic": True}, "static"),
        ({**FP8_TENSOR, "symmetric": False}, "symmetric"),
    ],
)
def test_kv_cache_arguments_we_cannot_calibrate_are_refused(kv, match):
    with pytest.raises(ValueError, match=match):
        QuantizationModifier(kv_cache_scheme=kv)


def test_kv_cache_in_training_is_refused():
    with pytest.raises(ValueError, match="post-training only"):
        QuantizationModifier(scheme="W8A8", kv_cache_scheme=FP8_TENSOR, start=0)
