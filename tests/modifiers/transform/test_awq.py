"""AWQModifier: validation, the scale search, the function kept by the folded scales, and
the quantization that follows (to nearest, GPTQ), saved and reloaded."""

import re

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from pydantic import ValidationError
from smoothing_helpers import (
    FunctionProbe,
    captured_logs,
    logits,
    random_ids,
    tiny_llama,
    tiny_qwen2_mha,
)

from compressor import Recipe, oneshot, save_compressed
from compressor.modifiers import AWQModifier, GPTQModifier, QuantizationModifier
from compressor.modifiers.quantization.fake_quant import fake_quantize_weight
from compressor.modifiers.transform.awq import (
    awq_grid,
    candidate_scales,
    quantize_with_scales,
    weight_means,
)

W4_ASYM = {"num_bits": 4, "strategy": "group", "group_size": 16, "symmetric": False}
W4_GROUPS = {"g": {"targets": ["Linear"], "weights": W4_ASYM}}
# asymmetric int4 checkpoints do not reload in transformers yet (its packed zero points are
# read with the unpacked shape), so the tests that reload quantize symmetrically
W4_SYM_GROUPS = {"g": {"targets": ["Linear"], "weights": {**W4_ASYM, "symmetric": True}}}

# llm-compressor 0.14's AWQ layout (its examples): the transform, then the quantizer
AWQ_THEN_RTN = """
quant_stage:
  quant_modifiers:
    AWQModifier:
      duo_scaling: true
      n_grid: 10
      mappings:
        - smooth_layer: re:.*input_layernorm$
          balance_layers: [re:.*q_proj$, re:.*k_proj$, re:.*v_proj$]
        - smooth_layer: re:.*post_attention_layernorm$
          balance_layers: [re:.*gate_proj$, re:.*up_proj$]
        - smooth_layer: re:.*up_proj$
          balance_layers: [re:.*down_proj$]
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 16}
"""

# its older form: AWQModifier with the quantization fields
AWQ_OWN_SCHEME = """
quant_stage:
  quant_modifiers:
    AWQModifier:
      ignore: [lm_head]
      targets: [Linear]
      n_grid: 8
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 16}
"""


def test_fields_are_validated_when_the_recipe_is_parsed():
    with pytest.raises(ValidationError, match="duo_scaling='sometimes' must be true, false"):
        AWQModifier(duo_scaling="sometimes")
    with pytest.raises(ValidationError, match="n_grid=2 is too small for duo_scaling=True"):
        AWQModifier(n_grid=2)
    with pytest.raises(ValidationError, match="give one of those, or put targets/ignore"):
        AWQModifier(ignore=["lm_head"])
    static = {"g": {"targets": ["Linear"], "weights": W4_ASYM, "input_activations": {}}}
    with pytest.raises(ValidationError, match="input_activations are static"):
        AWQModifier(config_groups=static)
    with pytest.raises(ValidationError, match="start=0.0: AWQModifier runs only"):
        AWQModifier(start=0)


def test_llm_compressor_layouts_load_and_round_trip():
    for text in (AWQ_THEN_RTN, AWQ_OWN_SCHEME):
        recipe = Recipe.from_yaml(text)
        assert isinstance(recipe.modifiers[0], AWQModifier)
        assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    awq = Recipe.from_yaml(AWQ_THEN_RTN).modifiers[0]
    assert (awq.duo_scaling, awq.n_grid, len(awq.mappings)) == (True, 10, 3)


def test_the_grid_walks_llm_compressors_candidates():
    duo = awq_grid(20, True)
    assert duo[0] == (0.0, False) and len(duo) == 20
    assert [r for r, _ in duo[1:]] == [i / 18 for i in range(19)] and all(d for _, d in duo[1:])
    assert awq_grid(5, False) == [
        (0.0, False),
        (0.25, False),
        (0.5, False),
        (0.75, False),
        (1.0, False),
    ]
    both = awq_grid(8, "both")
    assert len(both) == 8 and {d for _, d in both} == {False, True}


def test_candidates_are_normalised_and_the_identity_quantizes_as_rounding_to_nearest():
    gen = torch.Generator().manual_seed(0)
    x_mean = torch.rand(32, generator=gen) * 3
    weight = torch.randn(8, 32, generator=gen)
    args = QuantizationArgs(**W4_ASYM)
    w_mean = weight_means([(weight, args)])
    assert w_mean.shape == (32,) and w_mean.min() > 0 and w_mean.max() <= 1
    for ratio, duo in awq_grid(6, True):
        s = candidate_scales(x_mean, w_mean, ratio, duo)
        torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))
    identity = candidate_scales(x_mean, w_mean, 0.0, False)
    torch.testing.assert_close(identity, torch.ones(32))
    torch.testing.assert_close(
        quantize_with_scales(weight, identity, args, "w"), fake_quantize_weight(weight, args)
    )


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2_mha], ids=["llama-gqa", "qwen2-mha"])
def test_the_folded_scales_keep_the_models_function_before_quantization(build):
    model = build()
    before = logits(model)
    probe = FunctionProbe()
    awq = AWQModifier(n_grid=8)
    quant = QuantizationModifier(config_groups=W4_GROUPS, ignore=["lm_head"])
    oneshot(model, [awq, quant, probe], random_ids())
    assert len(probe._logits) >= 2
    for seen in probe._logits:  # full precision, after each layer's scales were folded
        torch.testing.assert_close(seen, before, rtol=0, atol=1e-4)
    # the model is now quantized: its function changed
    assert not torch.allclose(logits(model), before, atol=1e-4)


def quantized_linears(model):
    return [
        m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]


def test_each_mapping_gets_scales_no_worse_than_the_identity_and_the_model_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    with captured_logs("DEBUG") as lines:
        awq = tiny_qwen2_mha()
        oneshot(awq, Recipe.from_yaml(AWQ_OWN_SCHEME), random_ids())
    searched = [line for line in lines if line.startswith("AWQ model.layers.")]
    assert len(searched) == 8  # 2 layers x 4 mappings (v_proj -> o_proj included: no GQA)
    pattern = re.compile(r"error ([0-9.e+-]+) at identity, ([0-9.e+-]+) with the best")
    errors = [tuple(float(v) for v in pattern.search(line).groups()) for line in searched]
    assert all(best <= identity for identity, best in errors), searched
    assert any(best < identity for identity, best in errors)  # the search moved something
    save_compressed(awq, tmp_path / "awq")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "awq").eval()
    torch.testing.assert_close(logits(reloaded), logits(awq), rtol=1e-4, atol=1e-4)
    for module in quantized_linears(reloaded):  # int4 groups of 16, as compressed-tensors reloads
        assert module.weight_scale.shape[-1] == module.in_features // 16


def test_awq_composes_with_gptq_whose_codes_lie_on_the_grid(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    recipe = Recipe.from_yaml(AWQ_THEN_RTN)
    gptq = GPTQModifier(config_groups=W4_SYM_GROUPS, ignore=["lm_head"])
    oneshot(model, [recipe.modifiers[0], gptq], random_ids())
    alone = tiny_llama()
    oneshot(alone, [GPTQModifier(config_groups=W4_SYM_GROUPS, ignore=["lm_head"])], random_ids())
    for module in quantized_linears(model):
        args = module.quantization_scheme.weights
        codes = fake_quantize(module.weight, module.weight_scale, None, args)
        torch.testing.assert_close(codes, module.weight, rtol=0, atol=0)
    q_awq = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q_awq, alone.model.layers[0].self_attn.q_proj.weight)
    save_compressed(model, tmp_path / "awq_gptq")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "awq_gptq").eval()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-4, atol=1e-4)


def test_awq_then_gptq_is_gptq_on_the_smoothed_model(monkeypatch):
    """What a user of the pair expects: AWQ's scales folded, then GPTQ exactly as it runs
    alone on the smoothed model, with its own min-max scales of the smoothed weights and its
    Hessians of the smoothed inputs (a Hessian gathered before the fold, on the inputs the
    layer had before smoothing, would change every weight)."""
    from compressor.modifiers.transform.smoothing import fold_smoothing_scales

    folded: list[tuple[str, list[str], torch.Tensor]] = []
    fold = AWQModifier._fold

    def recording_fold(self, resolved, scales):
        folded.append((resolved.smooth_name, list(resolved.balance_names), scales.clone()))
        fold(self, resolved, scales)

    monkeypatch.setattr(AWQModifier, "_fold", recording_fold)
    gptq_asym = {"g": {"targets": ["Linear"], "weights": W4_ASYM}}
    both = tiny_llama()
    awq = Recipe.from_yaml(AWQ_THEN_RTN).modifiers[0]
    oneshot(both, [awq, GPTQModifier(config_groups=gptq_asym, ignore=["lm_head"])], random_ids())
    assert len(folded) == 6  # 2 layers x 3 mappings
    assert any(not torch.allclose(s, torch.ones_like(s)) for _, _, s in folded)

    smoothed = tiny_llama()
    for smooth, balances, scales in folded:
        fold_smoothing_scales(
            smoothed.get_submodule(smooth), [smoothed.get_submodule(b) for b in balances], scales
        )
    oneshot(smoothed, [GPTQModifier(config_groups=gptq_asym, ignore=["lm_head"])], random_ids())
    for (name, ours), (_, expected) in zip(
        both.named_parameters(), smoothed.named_parameters(), strict=True
    ):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6, msg=name)


def test_without_a_quantization_scheme_it_says_what_to_add():
    with pytest.raises(
        ValueError, match="give AWQModifier a scheme, or put a QuantizationModifier"
    ):
        oneshot(tiny_llama(), [AWQModifier()], random_ids())


def test_duo_scaling_with_per_tensor_weights_is_refused_naming_the_layer():
    tensor = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "tensor"}}}
    with pytest.raises(ValueError, match=r"q_proj is quantized per tensor; set duo_scaling: false"):
        oneshot(tiny_llama(), [AWQModifier(config_groups=tensor, ignore=["lm_head"])], random_ids())


def test_an_unknown_architecture_without_mappings_is_told_what_to_pass():
    from conftest import tiny_opt

    with pytest.raises(ValueError, match="Pass `mappings` explicitly"):
        oneshot(tiny_opt(2), [AWQModifier(config_groups=W4_GROUPS)], random_ids())
