import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from compressor import create_session
from compressor.modifiers.transform.spinquant import (
    SpinQuantModifier,
    infer_mapping_from_model,
    infer_norm_mappings_from_model,
)

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def _model(model_type, **overrides):
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norm scales and biases, so fusion is exercised
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    return model


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        ("llama", {}),
        ("mistral", {"tie_word_embeddings": True}),
        ("qwen2", {"tie_word_embeddings": True}),  # q/k/v biases
        ("qwen3", {"head_dim": 16}),  # per-head q_norm/k_norm, head_dim != hidden/heads
    ],
)
def test_inferred_architectures_stay_invariant(model_type, overrides):
    model = _model(model_type, **overrides)
    mapping = infer_mapping_from_model(model)
    assert mapping.lm_head == "lm_head" and len(infer_norm_mappings_from_model(model)) == 3
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = model(ids).logits
    v_before = model.model.layers[0].self_attn.v_proj.weight.clone()
    with create_session() as session:
        session.initialize(model, SpinQuantModifier(transform_type="random-hadamard"))
        session.calibration_epoch_start()
        session.calibration_epoch_end()
        session.finalize()
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, v_before)
    assert (model(ids).logits - expected).abs().max() < 1e-4


def test_unknown_architecture_says_which_mapping_to_pass():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*llama.*Pass `mappings`"):
        infer_mapping_from_model(model)
    # GPT-2 normalises with LayerNorm, named with what a LayerNorm model needs
    with pytest.raises(ValueError, match="normalises with LayerNorm .*pass `norm_mappings`"):
        infer_norm_mappings_from_model(model)
    # and its Conv1D projections are refused before any mapping is looked up
    with create_session() as session, pytest.raises(ValueError, match="Conv1D"):
        session.initialize(model, SpinQuantModifier())
