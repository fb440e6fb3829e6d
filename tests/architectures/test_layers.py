import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from compressor.architectures import find_decoder_layers, find_decoder_layers_path


def test_find_decoder_layers(tiny_llama):
    path, layers = find_decoder_layers(tiny_llama)
    assert path == "model.layers" and len(layers) == 2
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50))
    assert find_decoder_layers(gpt2)[0] == "transformer.h"
    bert = BertModel(
        BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    )
    assert find_decoder_layers(bert)[0] == "encoder.layer"
    with pytest.raises(ValueError, match="cannot find the decoder layers of a Linear"):
        find_decoder_layers(torch.nn.Linear(2, 2))


def test_an_unlisted_model_with_a_known_layout_is_found(tiny_llama):
    tiny_llama.config.model_type = "not-a-listed-type"
    assert find_decoder_layers_path(tiny_llama) == "model.layers"
    assert find_decoder_layers_path(tiny_llama.model) == "layers"
