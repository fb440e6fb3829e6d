import copy

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


@pytest.mark.parametrize("block", [None, 4])
def test_embedding_output_rotation(block):
    embedding = torch.nn.Embedding(10, 8).double()
    ids = torch.tensor([1, 5, 9])
    before = embedding(ids)
    # not symmetric, so that R and its transpose give different results
    rotation = rotation_matrix("random-matrix", block or 8, generator=torch.Generator())
    assert not torch.allclose(rotation, rotation.T)
    rotate_output(embedding, rotation)
    full = torch.block_diag(*[rotation] * (8 // rotation.shape[0]))
    torch.testing.assert_close(embedding(ids), before @ full)


def test_rotation_size_must_divide_the_width():
    with pytest.raises(ValueError, match="does not divide the input width 16"):
        rotate_input(_linear(16, 4), rotation_matrix("random-matrix", 5))
    with pytest.raises(TypeError, match="needs a Linear"):
        rotate_input(torch.nn.Embedding(4, 4), torch.eye(4))


@pytest.mark.parametrize("shape", [(4, 1), (4, 2), (2, 4)])
def test_a_rotation_must_be_square(shape):
    rotation = torch.randn(*shape, dtype=torch.float64)
    for rotate, module in (
        (rotate_output, _linear(4, 8)),
        (rotate_input, _linear(8, 4)),
        (rotate_output, torch.nn.Embedding(4, 8)),
    ):
        with pytest.raises(
            ValueError, match=rf"must be square, got shape \({shape[0]}, {shape[1]}\)"
        ):
            rotate(module, rotation)


def _rounding_errors(module, rotate, rotation, exact):
    """The mean error of ``rotate`` on ``module`` (in float64), and of the same product
    computed in float32, against ``exact``."""
    in_float32 = copy.deepcopy(module)
    rotate(in_float32, rotation, precision=torch.float32)
    rotate(module, rotation, precision=torch.float64)
    assert module.weight.dtype == torch.float32
    mine = (module.weight.double() - exact).abs().mean()
    return mine, (in_float32.weight.double() - exact).abs().mean()


@pytest.mark.parametrize("kind", ["output", "input", "embedding"])
def test_float32_weights_keep_their_dtype_and_are_rotated_in_precision(kind):
    """The product is computed in ``precision`` and rounded once into the weight's dtype:
    as close to the exact product as float32 can hold, closer than a float32 product."""
    torch.manual_seed(0)
    module = torch.nn.Embedding(64, 64) if kind == "embedding" else torch.nn.Linear(64, 64)
    rotation = rotation_matrix("random-matrix", 64, generator=torch.Generator().manual_seed(1))
    w = module.weight.detach().double()
    exact = rotation.T @ w if kind == "output" else w @ rotation
    rotate = rotate_input if kind == "input" else rotate_output
    mine, float32 = _rounding_errors(module, rotate, rotation, exact)
    torch.testing.assert_close(module.weight.detach(), exact.float(), rtol=0, atol=1e-7)
    assert mine < 0.6 * float32


def test_a_norm_fused_into_lower_precision_linears_is_multiplied_in_precision():
    """A float32 norm scale folded into bfloat16 linears is multiplied at full precision and
    rounded once (rounding the scale to bfloat16 first would round twice)."""
    torch.manual_seed(0)
    norm = LlamaRMSNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    linear = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    scale = norm.weight.detach().double().clone()
    exact = linear.weight.detach().double() * scale
    fuse_norm_into_linears(norm, [linear])
    assert linear.weight.dtype == torch.bfloat16
    assert torch.equal(linear.weight, exact.to(torch.bfloat16))


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
    # transformers re-ties what its tied-weights mapping lists (init_weights, loading): the
    # head is no longer in it
    model.tie_weights(recompute_mapping=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert not reloaded.config.tie_word_embeddings
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_untied_head_is_a_copy_that_keeps_the_embeddings_trainability():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    model.model.embed_tokens.weight.requires_grad_(False)  # a frozen embedding
    before = model.model.embed_tokens.weight.detach().clone()
    assert untie_word_embeddings(model)
    assert not model.lm_head.weight.requires_grad
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    assert torch.equal(model.model.embed_tokens.weight, before)
