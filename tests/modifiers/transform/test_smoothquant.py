"""SmoothQuantModifier: validation, the function kept by the folded scales, and W8A8 after it."""

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from pydantic import ValidationError
from smoothing_helpers import (
    FunctionProbe,
    captured_logs,
    logits,
    random_ids,
    tiny_llama,
    tiny_qwen3,
)

from compressor import Recipe, oneshot, save_compressed
from compressor.modifiers import QuantizationModifier, SmoothQuantModifier
from compressor.modifiers.transform.smoothquant import smoothquant_scales

# llm-compressor's SmoothQuant W8A8 recipe layout (its examples), written here for the tests
SMOOTHQUANT_W8A8 = """
quant_stage:
  quant_modifiers:
    SmoothQuantModifier:
      smoothing_strength: 0.8
      mappings:
        - [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"]
        - [["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"]
    GPTQModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
          input_activations: {num_bits: 8, type: int, symmetric: true, strategy: tensor,
                              dynamic: false, observer: static_minmax}
"""


def test_smoothing_strength_outside_the_unit_interval_is_refused_when_parsed():
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValidationError, match=rf"smoothing_strength={alpha} must lie in"):
            SmoothQuantModifier(smoothing_strength=alpha)
    with pytest.raises(ValidationError, match="start=0.0: SmoothQuantModifier runs only"):
        SmoothQuantModifier(start=0)
    assert SmoothQuantModifier(smoothing_strength=0).smoothing_strength == 0


def test_scales_balance_activation_and_weight_ranges_at_half_strength():
    gen = torch.Generator().manual_seed(0)
    act = torch.rand(16, generator=gen) * 20 + 0.1
    weights = [torch.randn(8, 16, generator=gen), torch.randn(4, 16, generator=gen)]
    s = smoothquant_scales(act, weights, 0.5)
    weight_range = 2 * torch.cat(weights).abs().amax(dim=0)
    # alpha = 0.5: the smoothed activation and the scaled weights have the same range
    torch.testing.assert_close(act / s, weight_range * s, rtol=1e-5, atol=1e-6)
    # alpha = 1: every activation range becomes the weights' range... of one
    torch.testing.assert_close(act / smoothquant_scales(act, weights, 1.0), torch.ones(16))
    torch.testing.assert_close(smoothquant_scales(act, weights, 0.0), 1 / weight_range)


def test_recipe_round_trip_and_llm_compressor_layout():
    recipe = Recipe.from_yaml(SMOOTHQUANT_W8A8)
    smooth = recipe.modifiers[0]
    assert isinstance(smooth, SmoothQuantModifier) and smooth.smoothing_strength == 0.8
    assert smooth.mappings[1].smooth_layer == "re:.*post_attention_layernorm"
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3"])
@pytest.mark.parametrize("pipeline", ["sequential", "basic"])
def test_the_folded_scales_keep_the_models_function(build, pipeline):
    model = build()
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    before = logits(model)
    oneshot(model, [SmoothQuantModifier(smoothing_strength=0.8)], random_ids(), pipeline=pipeline)
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, norm)  # smoothed
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-4)


def test_quantizers_calibrate_the_smoothed_layer():
    """QuantizationModifier's weight scales and static input ranges are those of the smoothed
    weights and activations: each layer is smoothed before the quantizers observe it."""
    model = tiny_llama()
    probe = FunctionProbe()
    static = {
        "g": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "strategy": "tensor", "dynamic": False},
        }
    }
    quant = QuantizationModifier(config_groups=static, ignore=["lm_head"])
    before = logits(model)
    data = random_ids()
    oneshot(model, [SmoothQuantModifier(smoothing_strength=0.8), quant, probe], data)
    for seen in probe._logits:  # full precision after each layer's smoothing: unchanged
        torch.testing.assert_close(seen, before, rtol=0, atol=1e-4)
    q_proj = model.model.layers[1].self_attn.q_proj
    args = q_proj.quantization_scheme
    # the weight scale is the smoothed weight's (symmetric int8 per channel: 2 max |w| / 255)
    expected = q_proj.weight.abs().amax(dim=1, keepdim=True) / 127.5
    torch.testing.assert_close(q_proj.weight_scale, expected, rtol=1e-5, atol=1e-8)
    # the input range observed is the smoothed norm output's
    seen = []
    handle = q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().max()))
    with torch.no_grad():
        q_proj.quantization_enabled = False
        for row in data["input_ids"]:
            model(torch.tensor([row]))
        q_proj.quantization_enabled = True
    handle.remove()
    assert args.input_activations is not None
    assert torch.isclose(q_proj.input_scale, torch.stack(seen).max() / 127.5, rtol=0.05)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3"])
def test_smoothquant_then_gptq_static_w8a8_saves_codes_on_the_grid_and_reloads(build, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build()
    plain = build()
    recipe = Recipe.from_yaml(SMOOTHQUANT_W8A8)
    oneshot(model, recipe, random_ids())
    without = Recipe.from_yaml(SMOOTHQUANT_W8A8)
    oneshot(plain, [without.modifiers[1]], random_ids())
    linears = [
        m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    ]
    for module in linears:
        args = module.quantization_scheme.weights
        codes = fake_quantize(module.weight, module.weight_scale, None, args)
        torch.testing.assert_close(codes, module.weight, rtol=0, atol=0)  # on the int8 grid
        assert module.input_scale.numel() == 1 and module.input_scale > 0  # static, per tensor
    # smoothing changed what GPTQ quantized
    assert not torch.allclose(
        model.model.layers[0].self_attn.q_proj.weight, plain.model.layers[0].self_attn.q_proj.weight
    )
    save_compressed(model, tmp_path / "sq")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sq").eval()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-4, atol=1e-4)


def test_num_calibration_steps_is_accepted_and_said_to_have_no_effect():
    model = tiny_llama()
    with captured_logs() as lines:
        oneshot(model, [SmoothQuantModifier(num_calibration_steps=2)], random_ids())
    assert any("num_calibration_steps=2 has no effect" in line for line in lines)


def test_without_calibration_data_it_is_a_clear_error():
    with pytest.raises(ValueError, match="dataset"):
        oneshot(tiny_llama(), [SmoothQuantModifier()], None)


def test_the_smoothing_pass_stops_after_the_last_norm_with_the_same_result(monkeypatch):
    """SmoothQuant's pass of its own ends each forward once the post-attention norm has run
    (the MLP is not needed for its statistics); the smoothed and quantized model is exactly
    the one a pass running every layer whole gives."""
    from compressor.calibration.pipelines import sequential

    static = {
        "g": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "strategy": "tensor", "dynamic": False},
        }
    }

    def run() -> tuple[dict, int]:
        model = tiny_llama()
        mlp_calls = []
        for layer in model.model.layers:
            layer.mlp.register_forward_pre_hook(lambda m, a: mlp_calls.append(m))
        recipe = [
            SmoothQuantModifier(smoothing_strength=0.8),
            QuantizationModifier(config_groups=static, ignore=["lm_head"]),
        ]
        oneshot(model, recipe, random_ids(count=6), pipeline="sequential")
        return model.state_dict(), len(mlp_calls)

    monkeypatch.setattr(sequential, "MERGE_TOKENS", 24)  # each row its own call
    cut, cut_calls = run()

    def run_whole(layer, call, owners):
        layer(*call.args, **call.kwargs)

    monkeypatch.setattr(sequential, "_last_hooked_module", run_whole)
    whole, whole_calls = run()
    assert cut.keys() == whole.keys()
    assert all(torch.equal(cut[key], whole[key]) for key in cut)
    layers = len(tiny_llama().model.layers)
    # whole: every call runs each layer's MLP in the smoothing pass; cut: only the first
    assert whole_calls - cut_calls == layers * (6 - 1)


# llm-compressor's logarithmic equalization recipe layouts (the deprecated modifier and its
# replacement), written here for the tests
LOG_EQUALIZATION = """
quant_stage:
  quant_modifiers:
    {modifier}:
      mappings:
        - [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"]
        - [["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"]
"""


@pytest.mark.parametrize(
    "modifier",
    ["LogarithmicEqualizationModifier", "SmoothQuantModifier:\n      algorithm: log_equalization"],
    ids=["deprecated-name", "algorithm"],
)
def test_logarithmic_equalization_folds_range_over_log_range_keeping_the_function(modifier):
    """Both of llm-compressor's spellings: each smoothed channel is divided by
    ``r / log2(2 + r)``, ``r`` its observed range (max - min), whatever the weights; the
    model's function is unchanged."""
    head, _, rest = modifier.partition(":\n")
    text = LOG_EQUALIZATION.replace("{modifier}", head)
    if rest:
        text = text.replace(f"    {head}:\n", f"    {head}:\n{rest}\n")
    recipe = Recipe.from_yaml(text)
    (smooth,) = recipe.modifiers
    assert isinstance(smooth, SmoothQuantModifier) and smooth.algorithm == "log_equalization"
    model = tiny_llama()
    norm = model.model.layers[0].input_layernorm
    before_norm = norm.weight.detach().clone()
    seen = []
    handle = norm.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    before = logits(model)
    data = random_ids()
    with torch.no_grad():
        for row in data["input_ids"]:
            model(torch.tensor([row]))
    handle.remove()
    outputs = torch.cat([o.reshape(-1, o.shape[-1]) for o in seen[1:]])  # the data's rows
    r = (outputs.amax(0) - outputs.amin(0)).double()
    expected = (r / torch.log2(2 + r)).float()
    oneshot(model, recipe, data)
    torch.testing.assert_close(before_norm / norm.weight.detach(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-4)


def test_logarithmic_equalization_says_smoothing_strength_has_no_effect():
    with captured_logs() as lines:
        oneshot(tiny_llama(), [SmoothQuantModifier(algorithm="log_equalization",
                                                   smoothing_strength=0.8)], random_ids())  # fmt: skip
    assert any("smoothing_strength=0.8 has no effect" in line for line in lines)
    with pytest.raises(ValidationError, match="smoothquant.*log_equalization"):
        SmoothQuantModifier(algorithm="log")
