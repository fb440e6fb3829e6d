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
