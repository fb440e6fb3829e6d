"""SpinQuant on LayerNorm models: the residual stream centred, LayerNorms folded, R1 made to
keep the stream zero-mean, so OPT computes the same function and reloads as a plain OPT."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from compressor import create_session, save_compressed
from compressor.entrypoints.loading import load_model
from compressor.modifiers import SpinQuantModifier
from compressor.modifiers.transform.spinquant.centring import (
    centre_residual_writers,
    fuse_layer_norm_into_linears,
    ones_preserving,
)
from compressor.modifiers.transform.spinquant.matrices import rotation_matrix
from conftest import tiny_llama_config

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


def _opt(**overrides):
    """A tiny OPT whose LayerNorms have random scales and biases and whose embeddings are far
    from zero-mean, so that neither folding nor centring is trivially exact."""
    values = dict(
        vocab_size=128,
        hidden_size=64,
        ffn_dim=192,  # 3 * 64: R4 needs a non-power-of-two Hadamard
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=64,
        dropout=0.0,
    )
    values.update(overrides)
    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(**values)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_(torch.randn_like(param) * 0.3 + (1.0 if "weight" in name else 0.0))
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
        model.model.decoder.embed_tokens.weight.add_(0.3)
        model.model.decoder.embed_positions.weight.add_(-0.2)
    return model


def _oneshot(model, modifier):
    with create_session() as session:
        session.initialize(model, modifier)
        session.calibration_epoch_start()
        session.calibration_epoch_end()
        session.finalize()
    return model


# ---------------------------------------------------------------- the pure functions
def test_centred_writers_write_zero_mean_outputs():
    torch.manual_seed(0)
    embedding, linear = torch.nn.Embedding(10, 16), torch.nn.Linear(8, 16)
    with torch.no_grad():
        embedding.weight.add_(1.0)
        linear.bias.add_(2.0)
    x = torch.randn(5, 8)
    before = linear(x)
    centre_residual_writers([embedding, linear])
    assert embedding.weight.mean(dim=1).abs().max() < 1e-6
    after = linear(x)
    assert after.mean(dim=1).abs().max() < 1e-6
    # what a LayerNorm reads is unchanged: the output minus its mean
    assert torch.allclose(after, before - before.mean(dim=1, keepdim=True), atol=1e-6)
    with pytest.raises(TypeError, match="Embedding or a Linear"):
        centre_residual_writers([torch.nn.LayerNorm(4)])


@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_folds_into_its_linears(with_bias):
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    linears = [torch.nn.Linear(16, 8, bias=with_bias), torch.nn.Linear(16, 4)]
    x = torch.randn(6, 16)
    expected = [lin(norm(x)) for lin in linears]
    kept = fuse_layer_norm_into_linears(norm, linears)
    # a linear without a bias cannot take W b: the norm keeps b / g
    assert kept is (not with_bias)
    assert torch.equal(norm.weight, torch.ones(16))
    assert bool(norm.bias.any()) is kept
    for lin, want in zip(linears, expected, strict=True):
        assert torch.allclose(lin(norm(x)), want, atol=1e-5)


def test_a_bias_with_a_zero_scale_and_no_linear_bias_is_refused():
    norm = torch.nn.LayerNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0]))
        norm.bias.fill_(0.5)
    with pytest.raises(ValueError, match="zeros in its scale"):
        fuse_layer_norm_into_linears(norm, [torch.nn.Linear(4, 2, bias=False)])


@pytest.mark.parametrize("kind, size", [("hadamard", 64), ("random-matrix", 48)])
def test_ones_preserving_rotation_fixes_the_mean_direction(kind, size):
    rotation = rotation_matrix(kind, size, generator=torch.Generator().manual_seed(0))
    q = ones_preserving(rotation)
    ones = torch.ones(size, dtype=torch.float64)
    assert not torch.allclose(ones @ rotation, ones)  # the plain rotation moves it
    assert torch.allclose(ones @ q, ones, atol=1e-12)
    assert torch.allclose(q.T @ q, torch.eye(size, dtype=torch.float64), atol=1e-12)
    # a Householder correction: the rotation is changed in one direction only
    assert torch.linalg.matrix_rank(q - rotation).item() == 1


# ---------------------------------------------------------------- OPT end to end
@pytest.mark.parametrize(
    "rotations, kind",
    [
        (["R1"], "hadamard"),
        (["R1", "R2"], "random-hadamard"),
        (["R1", "R2", "R4"], "random-hadamard"),
    ],
)
def test_opt_computes_the_same_function_after_rotation(rotations, kind):
    model = _opt()
    expected = model(IDS).logits
    v_before = model.model.decoder.layers[0].self_attn.v_proj.weight.clone()
    _oneshot(model, SpinQuantModifier(rotations=rotations, transform_type=kind))
    assert (model(IDS).logits - expected).abs().max() < 1e-4
    assert not torch.allclose(model.model.decoder.layers[0].self_attn.v_proj.weight, v_before)
    decoder = model.model.decoder
    # the LayerNorms stay LayerNorms (an ordinary OPT checkpoint), their scales folded
    for norm in (decoder.final_layer_norm, decoder.layers[1].self_attn_layer_norm):
        assert type(norm) is torch.nn.LayerNorm and torch.equal(norm.weight, torch.ones(64))
    # lm_head has no bias: the final norm keeps its (rotated) one; the layers' norms fold theirs
    assert decoder.final_layer_norm.bias.abs().max() > 0.1
    assert not decoder.layers[0].final_layer_norm.bias.any()


def test_opt_rotated_checkpoint_reloads_as_a_plain_opt(tmp_path):
    model = _opt()
    _oneshot(model, SpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard"))
    expected = model(IDS).logits
    save_compressed(model, tmp_path / "r1r2")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "r1r2").eval()
    assert type(plain) is OPTForCausalLM
    assert (plain(IDS).logits - expected).abs().max() < 1e-5


def test_opt_with_r4_reloads_with_its_online_rotation(tmp_path):
    model = _opt()
    _oneshot(
        model, SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="random-hadamard")
    )
    expected = model(IDS).logits
    save_compressed(model, tmp_path / "r4")
    reloaded = load_model(tmp_path / "r4", compressed_ok=True).eval()
    assert (reloaded(IDS).logits - expected).abs().max() < 1e-5


def test_llama_with_layer_norms_is_centred_too():
    # a family-independent check: Llama's projections have no biases, so every LayerNorm keeps
    # its bias as bias / scale, rotated with the stream
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    with torch.no_grad():
        owners = [(layer, attr) for layer in model.model.layers
                  for attr in ("input_layernorm", "post_attention_layernorm")]  # fmt: skip
        for owner, attr in [*owners, (model.model, "norm")]:
            norm = torch.nn.LayerNorm(32)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.3)
            setattr(owner, attr, norm)
        model.model.embed_tokens.weight.add_(0.5)
    expected = model(IDS).logits
    _oneshot(model, SpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard"))
    assert (model(IDS).logits - expected).abs().max() < 1e-4
    # centring is exact only if every norm on the stream centres: a mixed model is refused
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    model.model.layers[0].input_layernorm = torch.nn.LayerNorm(32)
    with create_session() as session, pytest.raises(ValueError, match="mixes LayerNorm and"):
        session.initialize(model, SpinQuantModifier())


# ---------------------------------------------------------------- what is refused
def test_layouts_that_cannot_be_centred_are_refused_by_name():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    cases = [
        (gpt2, r"GPT2LMHeadModel projects with transformers' Conv1D \(c_attn"),
        (_opt(do_layer_norm_before=False), r"do_layer_norm_before is False"),
        (_opt(word_embed_proj_dim=32), r"word_embed_proj_dim=32 differs from hidden_size=64"),
    ]
    for model, message in cases:
        with create_session() as session, pytest.raises(ValueError, match=message):
            session.initialize(model, SpinQuantModifier())


def test_learned_rotations_and_transform_config_are_refused_on_opt():
    learned = SpinQuantModifier(
        learnable=True, learn_activations={"num_bits": 4, "strategy": "token", "dynamic": True}
    )
    with create_session() as session, pytest.raises(ValueError, match="LayerNorm model.*Cayley"):
        session.initialize(_opt(), learned)
    config = {"config_groups": {"R2": {"type": "hadamard", "apply": [
        {"targets": ["re:.*v_proj$"], "location": "weight_output"},
        {"targets": ["re:.*out_proj$"], "location": "weight_input", "inverse": True},
    ]}}}  # fmt: skip
    with create_session() as session, pytest.raises(ValueError, match="drop transform_config"):
        session.initialize(_opt(), SpinQuantModifier(transform_config=config))
