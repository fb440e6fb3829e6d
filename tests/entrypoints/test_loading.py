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
