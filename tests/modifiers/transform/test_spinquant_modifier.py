import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaForCausalLM

from compressor import Recipe, create_session
from compressor.core import Event, EventType, State
from compressor.modifiers import SpinQuantModifier, get_modifier_class
from compressor.modifiers.transform.spinquant import NormMapping
from conftest import tiny_llama_config

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _llama(unit_norms=False, **overrides):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    if unit_norms:
        return model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def _oneshot(model, modifier):
    with create_session() as session:
        session.initialize(model, modifier)
        session.calibration_epoch_start()
        session.calibration_epoch_end()
        session.finalize()
    return model


# ---------------------------------------------------------------- configuration
def test_fields_match_llm_compressor_and_normalise():
    modifier = SpinQuantModifier(rotations=["r2", "R1"], precision="float32")
    assert modifier.rotations == ["R2", "R1"] and modifier.precision == torch.float32
    assert get_modifier_class("SpinQuant") is SpinQuantModifier
    defaults = SpinQuantModifier()
    assert defaults.rotations == ["R1", "R2"] and defaults.precision == torch.float64
    assert defaults.transform_type == "hadamard" and not defaults.randomize


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rotations": ["R5"]}, r"must be among R1, R2, R3, R4; got \['R5'\]"),
        ({"rotations": ["R1", "r1"]}, "lists one twice"),
        ({"transform_type": "walsh"}, "hadamard"),
        ({"learnable": True}, "learnable=True"),
        ({"precision": "int8"}, r"precision must be one of torch.float64"),
        ({"precision": "float77"}, "No such torch dtype"),
        ({"mapping": {}}, "mapping"),
        (
            {"transform_config": {"config_groups": {"R1": {"type": "quip", "apply": []}}}},
            r"config_groups.R1.type must be one of",
        ),
    ],
)
def test_bad_arguments_fail_at_parse_time(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        SpinQuantModifier(**kwargs)


def test_recipe_round_trip_keeps_every_argument():
    text = """
spinquant_stage:
  rotation_modifiers:
    SpinQuantModifier:
      rotations: [r1]
      transform_type: random-matrix
      randomize: true
      precision: float32
      norm_mappings:
        - {norm: "re:.*input_layernorm$", linears: ["re:.*q_proj$"]}
      transform_config:
        config_groups:
          R2:
            type: random-hadamard
            head_dim: 8
            apply:
              - {targets: ["re:.*v_proj$"], location: weight_output}
              - {targets: ["re:.*o_proj$"], location: weight_input, inverse: true}
"""
    recipe = Recipe.from_yaml(text)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    modifier = again.modifiers[0]
    assert modifier.rotations == ["R1"] and modifier.precision == torch.float32
    assert modifier.transform_config.config_groups["R2"].head_dim == 8


# ---------------------------------------------------------------- invariance
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("transform_type", ["hadamard", "random-hadamard", "random-matrix"])
def test_rotated_tiny_llama_computes_the_same_logits(tied, transform_type):
    model = _llama(tie_word_embeddings=tied)  # GQA: 4 query heads, 2 key-value heads
    expected = model(IDS).logits
    before = {n: p.clone() for n, p in model.named_parameters(remove_duplicate=False)}
    _oneshot(model, SpinQuantModifier(transform_type=transform_type, randomize=True))
    assert (model(IDS).logits - expected).abs().max() < 1e-4
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    for part in ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"):
        assert any(part in name for name in changed), part
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if "norm" in n)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings


def test_stories260k_stays_invariant_and_reloads(stories_model_path, tmp_path):
    model = LlamaForCausalLM.from_pretrained(stories_model_path).eval()
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    expected = model(ids).logits
    _oneshot(model, SpinQuantModifier())
    rotated = model(ids).logits
    assert (rotated - expected).abs().max() < 1e-4
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    torch.testing.assert_close(reloaded(ids).logits, rotated, rtol=0, atol=0)


def test_r1_spreads_the_outliers_of_the_residual_stream(stories_model_path):
    """The point of R1: the inputs of q/k/v get a flatter distribution (smaller max / rms)."""
    model = LlamaForCausalLM.from_pretrained(stories_model_path).eval()
    ids = torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(0))

    def peak_to_rms():
        seen = []
        handle = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].detach())
        )
        model(ids)
        handle.remove()
        x = seen[0].flatten(0, 1)
        return (x.abs().amax(dim=-1) / x.pow(2).mean(dim=-1).sqrt()).mean().item()

    plain = peak_to_rms()
    _oneshot(model, SpinQuantModifier(rotations=["R1"]))
    assert peak_to_rms() < 0.8 * plain


# ---------------------------------------------------------------- lifecycle
def test_rotates_on_calibration_start_not_at_initialize():
    model = _llama()
    before = model.model.embed_tokens.weight.clone()
    modifier = SpinQuantModifier()
    state = State(model=model)
    modifier.initialize(state, Event())
    assert torch.equal(model.model.embed_tokens.weight, before)
    modifier.update_event(state, Event(EventType.CALIBRATION_EPOCH_START))
    assert modifier.started and not torch.equal(model.model.embed_tokens.weight, before)
    modifier.update_event(state, Event(EventType.CALIBRATION_EPOCH_END))
    modifier.finalize(state)
    assert modifier.num_hooks == 0


def test_training_starts_at_start_step():
    model = _llama()
    expected = model(IDS).logits
    before = model.model.embed_tokens.weight.clone()
    modifier = SpinQuantModifier(start=2)
    state = State(model=model)
    modifier.initialize(state, Event())
    for step in range(4):
        modifier.update_event(state, Event(EventType.BATCH_START, global_step=step))
        rotated = not torch.equal(model.model.embed_tokens.weight, before)
        assert rotated == (step >= 2), step
        modifier.update_event(state, Event(EventType.BATCH_END, global_step=step + 1))
    modifier.finalize(state)
    assert (model(IDS).logits - expected).abs().max() < 1e-4


def test_unsupported_head_size_fails_at_initialize_and_random_matrix_works():
    config = dict(hidden_size=24, num_attention_heads=4, num_key_value_heads=2)  # head_dim 6
    with create_session() as session, pytest.raises(ValueError, match=r"size 6.*random-matrix"):
        session.initialize(_llama(**config), SpinQuantModifier())
    model = _llama(**config)
    expected = model(IDS).logits
    _oneshot(model, SpinQuantModifier(transform_type="random-matrix"))
    assert (model(IDS).logits - expected).abs().max() < 1e-4


def _r2_block(before, after, head_dim):
    """The rotation R with after = blockdiag(R).T @ before, read from the first head."""
    return torch.linalg.lstsq(before[:head_dim].T.double(), after[:head_dim].T.double()).solution


@pytest.mark.parametrize("randomize", [False, True])
def test_one_r2_per_layer_shared_by_its_heads(randomize):
    model = _llama(unit_norms=True, num_hidden_layers=3)  # no norm scale folded into v_proj
    head_dim = 8
    before = [layer.self_attn.v_proj.weight.clone() for layer in model.model.layers]
    expected = model(IDS).logits
    _oneshot(
        model,
        SpinQuantModifier(rotations=["R2"], transform_type="random-matrix", randomize=randomize),
    )
    blocks = [
        _r2_block(b, layer.self_attn.v_proj.weight, head_dim)
        for b, layer in zip(before, model.model.layers, strict=True)
    ]
    # every head of a layer uses the same block (grouped-query attention stays exact)
    layer = model.model.layers[0].self_attn.v_proj.weight
    torch.testing.assert_close(
        layer[head_dim:].double(), blocks[0].T @ before[0][head_dim:].double(), atol=1e-5, rtol=0
    )
    distinct = not torch.allclose(blocks[0], blocks[1], atol=1e-4)
    assert distinct == randomize
    assert (model(IDS).logits - expected).abs().max() < 1e-4


def test_custom_transform_config_replaces_the_built_one():
    model = _llama()
    expected = model(IDS).logits
    embed = model.model.embed_tokens.weight.clone()
    config = {
        "config_groups": {
            "R2": {
                "type": "hadamard",
                "head_dim": 8,
                "apply": [
                    {"targets": ["re:.*v_proj$"], "location": "weight_output"},
                    {"targets": ["re:.*o_proj$"], "location": "weight_input", "inverse": True},
                ],
            }
        }
    }
    _oneshot(model, SpinQuantModifier(transform_config=config))
    assert torch.equal(model.model.embed_tokens.weight, embed)  # no R1 this time
    assert (model(IDS).logits - expected).abs().max() < 1e-4


def test_readers_without_a_fused_norm_are_refused():
    partial = [
        NormMapping(
            norm="re:.*input_layernorm$", linears=["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"]
        )
    ]
    with create_session() as session, pytest.raises(ValueError, match=r"up_proj.*no norm_mappings"):
        session.initialize(_llama(), SpinQuantModifier(norm_mappings=partial))


def test_models_mixing_layernorm_and_rmsnorm_are_refused():
    # LayerNorm models are centred (test_spinquant_layernorm.py), which an RMSNorm cannot follow
    model = _llama()
    for layer in model.model.layers:
        layer.input_layernorm = torch.nn.LayerNorm(32)
    with create_session() as session, pytest.raises(ValueError, match="all LayerNorms"):
        session.initialize(model, SpinQuantModifier())


def test_targets_that_match_nothing_fail_at_initialize():
    mapping = {
        "embedding": "re:.*embed_tokens$",
        "attn_q": "re:.*query$",
        "attn_k": "re:.*k_proj$",
        "attn_v": "re:.*v_proj$",
        "attn_o": "re:.*o_proj$",
        "mlp_in": "re:.*up_proj$",
        "mlp_out": ["re:.*down_proj$"],
        "lm_head": "lm_head",
    }
    with (
        create_session() as session,
        pytest.raises(ValueError, match=r"target 're:.\*query\$' matches no"),
    ):
        session.initialize(_llama(), SpinQuantModifier(mappings=mapping))


def test_gpt2_layernorm_model_is_refused_naming_its_conv1d_layout():
    # OPT's LayerNorms are centred (test_spinquant_layernorm.py); GPT-2's Conv1D are not
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128))
    with create_session() as session, pytest.raises(ValueError, match=r"Conv1D \(c_attn"):
        session.initialize(gpt2, SpinQuantModifier())
