"""Per-channel scales moved between modules: the fold, the mappings, and their errors."""

import pytest
import torch
from pydantic import ValidationError
from smoothing_helpers import captured_logs, logits, tiny_llama, tiny_qwen2_mha

from compressor.architectures import BY_MODEL_TYPE, SmoothingMapping
from compressor.modifiers.transform.smoothing import (
    fold_smoothing_scales,
    infer_smoothing_mappings,
    resolve_smoothing_mappings,
)


def scales_for(width, seed=0):
    return torch.rand(width, generator=torch.Generator().manual_seed(seed)) * 4 + 0.25


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_folding_into_a_norm_keeps_the_function_with_and_without_the_gemma_offset(offset):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    linears = [torch.nn.Linear(16, 8), torch.nn.Linear(16, 4, bias=False)]
    x = torch.randn(5, 16)

    def run():
        normed = norm(x)
        if offset:  # Gemma's RMSNorm multiplies by (1 + weight): emulate on the same module
            normed = normed / norm.weight * (offset + norm.weight)
        return [linear(normed) for linear in linears]

    before = run()
    gamma = norm.weight.detach().clone()
    fold_smoothing_scales(norm, linears, scales_for(16), norm_weight_offset=offset)
    assert not torch.allclose(norm.weight, gamma)
    for old, new in zip(before, run(), strict=True):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


def test_folding_into_a_linears_last_rows_keeps_a_fused_projection_exact():
    fused = torch.nn.Linear(8, 24)  # q | k | v, each 8 wide: v is the last third
    reader = torch.nn.Linear(8, 5)
    x = torch.randn(3, 8)
    before = fused(x)
    out_before = reader(before[:, -8:])
    fold_smoothing_scales(fused, [reader], scales_for(8))
    after = fused(x)
    torch.testing.assert_close(after[:, :16], before[:, :16])  # q and k untouched
    torch.testing.assert_close(reader(after[:, -8:]), out_before, rtol=1e-5, atol=1e-5)


def test_mappings_take_llm_compressors_two_forms():
    pair = SmoothingMapping.model_validate([["re:.*q_proj", "re:.*k_proj"], "re:.*input_layernorm"])
    given = {
        "smooth_layer": "re:.*input_layernorm",
        "balance_layers": ["re:.*q_proj", "re:.*k_proj"],
    }
    assert pair == SmoothingMapping.model_validate(given)
    with pytest.raises(ValidationError, match=r"\[balance_layers, smooth_layer\]"):
        SmoothingMapping.model_validate([["re:.*q_proj"], "a", "b"])
    with pytest.raises(ValidationError, match="balance_layers"):
        SmoothingMapping(smooth_layer="x", balance_layers=[])


def test_every_listed_family_has_both_tables():
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"):
        table = BY_MODEL_TYPE[model_type]
        assert table.smoothquant and table.awq, model_type
    assert BY_MODEL_TYPE["gemma"].norm_weight_offset == 1.0


def test_an_unknown_architecture_is_told_to_pass_mappings(tiny_opt_model):
    with pytest.raises(ValueError, match="Pass `mappings` explicitly") as err:
        infer_smoothing_mappings(tiny_opt_model, "awq", "AWQModifier")
    assert "model_type='opt'" in str(err.value)


@pytest.fixture
def tiny_opt_model():
    from conftest import tiny_opt

    return tiny_opt(num_hidden_layers=2)


def test_default_mappings_leave_out_v_to_o_under_grouped_query_attention_and_say_so():
    model = tiny_llama()
    mappings, _ = infer_smoothing_mappings(model, "awq", "AWQModifier")
    with captured_logs() as lines:
        resolved = resolve_smoothing_mappings(model, mappings, [], "AWQModifier", inferred=True)
    resolved = [r for r in resolved if r.smooth_name.startswith("model.layers.0.")]
    assert [r.smooth_name.split(".", 3)[-1] for r in resolved] == [
        "input_layernorm",
        "post_attention_layernorm",
        "mlp.up_proj",
    ]
    assert any("not smoothed: model.layers.0.self_attn.v_proj" in line for line in lines)
    parents = {r.smooth_name.rsplit(".", 1)[-1]: r.parent_name for r in resolved}
    assert parents == {
        "input_layernorm": "model.layers.0.self_attn",
        "post_attention_layernorm": "model.layers.0.mlp",
        "up_proj": "model.layers.0.mlp.down_proj",
    }
    # without grouped-query attention, v_proj -> o_proj is kept, o_proj its own parent
    mha = tiny_qwen2_mha()
    mappings, _ = infer_smoothing_mappings(mha, "awq", "AWQModifier")
    resolved = resolve_smoothing_mappings(mha, mappings, [], "AWQModifier", inferred=True)
    v_to_o = [r for r in resolved if r.smooth_name.endswith("v_proj")]
    assert [r.parent_name for r in v_to_o] == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
    ]


def test_a_given_mapping_that_does_not_fit_or_matches_nothing_is_an_error_naming_it():
    model = tiny_llama()
    v_to_o = [SmoothingMapping(smooth_layer="re:.*v_proj$", balance_layers=["re:.*o_proj$"])]
    with pytest.raises(ValueError, match=r"v_proj \(Linear, weight \(16, 32\)\) does not write"):
        resolve_smoothing_mappings(model, v_to_o, [], "AWQModifier", inferred=False)
    nothing = [SmoothingMapping(smooth_layer="re:.*ln_1$", balance_layers=["re:.*c_attn$"])]
    with pytest.raises(ValueError, match=r"'re:\.\*ln_1\$'.* matches nothing in LlamaForCausalLM"):
        resolve_smoothing_mappings(model, nothing, [], "SmoothQuantModifier", inferred=False)
    norm_to_norm = [
        SmoothingMapping(smooth_layer="re:.*input_layernorm$", balance_layers=["re:.*mlp$"])
    ]
    with pytest.raises(ValueError, match="balance layers must be Linear"):
        resolve_smoothing_mappings(model, norm_to_norm, [], "SmoothQuantModifier", inferred=False)


def test_ignored_smooth_layers_are_left_out_with_a_log_line():
    model = tiny_llama()
    mappings, _ = infer_smoothing_mappings(model, "smoothquant", "SmoothQuantModifier")
    with captured_logs() as lines:
        resolved = resolve_smoothing_mappings(
            model, mappings, ["re:.*post_attention_layernorm$"], "SmoothQuantModifier", True
        )
    assert all(r.smooth_name.endswith("input_layernorm") for r in resolved)
    assert any("post_attention_layernorm (in ignore)" in line for line in lines)
    before = logits(model)
    assert before.shape[-1] == 128
