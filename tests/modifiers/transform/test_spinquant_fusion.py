import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from compressor.modifiers.transform.spinquant import (
    fuse_norm_into_linears,
    rotate_input,
    rotate_output,
    rotation_matrix,
    untie_word_embeddings,
)
from conftest import tiny_llama_config


def _linear(n_in, n_out, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(n_in, n_out, bias=bias).double()


@pytest.mark.parametrize("block", [None, 4])
def test_rotating_a_writer_and_its_reader_cancels(block):
    writer, reader = _linear(6, 16), _linear(16, 5, seed=1)
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = reader(writer(x))
    rotation = rotation_matrix("random-matrix", block or 16, generator=torch.Generator())
    before = writer(x)
    rotate_output(writer, rotation)
    rotate_input(reader, rotation)
    torch.testing.assert_close(reader(writer(x)), expected)
    # the intermediate activations really are rotated (per block when smaller)
    full = torch.block_diag(*[rotation] * (16 // rotation.shape[0]))
    torch.testing.assert_close(writer(x), before @ full)


def test_embedding_output_rotation():
    embedding = torch.nn.Embedding(10, 8).double()
    ids = torch.tensor([1, 5, 9])
    before = embedding(ids)
    rotation = rotation_matrix("hadamard", 8)
    rotate_output(embedding, rotation)
    torch.testing.assert_close(embedding(ids), before @ rotation)


def test_rotation_size_must_divide_the_width():
    with pytest.raises(ValueError, match="does not divide the input width 16"):
        rotate_input(_linear(16, 4), rotation_matrix("random-matrix", 5))
    with pytest.raises(TypeError, match="needs a Linear"):
        rotate_input(torch.nn.Embedding(4, 4), torch.eye(4))


def test_float32_weights_keep_their_dtype_and_are_rotated_in_precision():
    layer = torch.nn.Linear(8, 8)
    rotate_output(layer, rotation_matrix("hadamard", 8), precision=torch.float64)
    assert layer.weight.dtype == torch.float32


def test_fusing_a_norm_keeps_the_function_and_sets_the_scale_to_one():
    norm = LlamaRMSNorm(8).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    linears = [_linear(8, 4, seed=i) for i in range(2)]
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = [lin(norm(x)) for lin in linears]
    fuse_norm_into_linears(norm, linears)
    assert torch.equal(norm.weight, torch.ones(8, dtype=torch.float64))
    for lin, want in zip(linears, expected, strict=True):
        torch.testing.assert_close(lin(norm(x)), want)


def test_a_norm_with_a_bias_is_refused():
    with pytest.raises(ValueError, match="has a bias"):
        fuse_norm_into_linears(torch.nn.LayerNorm(8), [_linear(8, 4)])
    with pytest.raises(ValueError, match="width 8"):
        fuse_norm_into_linears(LlamaRMSNorm(8), [_linear(6, 4)])


def test_untie_gives_the_head_its_own_weight(tmp_path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert untie_word_embeddings(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert not untie_word_embeddings(model)  # nothing left to untie
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert not reloaded.config.tie_word_embeddings
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
