"""FP4 and MX presets (NVFP4, MXFP4, MXFP8): calibrated scales on their grids, the packed
compressed-tensors checkpoint reloaded with equal logits, and the errors for what cannot run."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationStatus, quantize
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from compressor import create_session, save_compressed
from compressor.modifiers import GPTQModifier, QuantizationModifier
from conftest import tiny_llama_config

# the magnitudes FP4 (E2M1) can hold
FP4_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FP8_E4M3_MAX = 448.0


def _bf16_llama(tmp_path, **overrides):
    """A tiny Llama in bfloat16, loaded the way a user loads one (so it equals its reload:
    transformers keeps the rotary frequencies in float32 when it loads in bfloat16)."""
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(**overrides)).save_pretrained(tmp_path / "dense")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16).eval()


def _calibrate(model, modifier, batches):
    with create_session() as session:
        session.initialize(model, [modifier])
        session.calibration_epoch_start()
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        session.calibration_epoch_end()
        session.finalize()
    return model


def _on_grid(values: torch.Tensor, grid: torch.Tensor) -> bool:
    return bool(torch.isin(values.abs().float(), grid).all())


def test_nvfp4_codes_are_e2m1_values_under_fp8_group_scales_and_a_global_scale(
    tmp_path, token_batches
):
    model = _calibrate(
        _bf16_llama(tmp_path), QuantizationModifier(scheme="NVFP4A16"), token_batches
    )
    module = model.model.layers[1].mlp.down_proj
    args = module.quantization_scheme.weights
    assert module.quantization_status == QuantizationStatus.FROZEN
    weight = module.weight.float()
    # the global scale maps the tensor's largest magnitude to 448 * 6
    expected_global = FP8_E4M3_MAX * 6.0 / weight.abs().max()
    assert torch.allclose(module.weight_global_scale.float(), expected_global, rtol=1e-3)
    # group scales (16 columns each), times the global scale, are fp8 E4M3 values
    assert module.weight_scale.shape == (weight.shape[0], weight.shape[1] // 16)
    fp8 = module.weight_scale.float()
    assert torch.equal(fp8.to(torch.float8_e4m3fn).float(), fp8)
    codes = quantize(
        module.weight,
        module.weight_scale,
        None,
        args,
        dtype=torch.float32,
        global_scale=module.weight_global_scale,
    )
    assert _on_grid(codes, FP4_E2M1)
    assert codes.abs().max() == 6.0  # the largest magnitude of some group reaches FP4's max


@pytest.mark.parametrize(("scheme", "num_bits"), [("MXFP4A16", 4), ("MXFP8A16", 8)])
def test_mx_scales_are_powers_of_two_shared_by_32_weights(
    tmp_path, token_batches, scheme, num_bits
):
    model = _calibrate(_bf16_llama(tmp_path), QuantizationModifier(scheme=scheme), token_batches)
    module = model.model.layers[0].self_attn.q_proj
    scale = module.weight_scale.float()
    assert scale.shape == (module.weight.shape[0], module.weight.shape[1] // 32)
    exponents = torch.log2(scale)
    assert torch.equal(exponents, exponents.round())  # E8M0: powers of two only
    codes = quantize(
        module.weight, module.weight_scale, None, module.quantization_scheme.weights, torch.float32
    )
    if num_bits == 4:
        assert _on_grid(codes, FP4_E2M1)
    else:  # FP8 E4M3 values
        assert torch.equal(codes.to(torch.float8_e4m3fn).float(), codes)
    # each group's largest weight lands in the format's top binade, not above its max
    top = 6.0 if num_bits == 4 else FP8_E4M3_MAX
    group_max = codes.abs().unflatten(1, (-1, 32)).amax(-1)
    assert (group_max <= top).all() and (group_max >= top / 4).all()


@pytest.mark.parametrize(
    "scheme", ["NVFP4A16", "NVFP4", "MXFP4A16", "MXFP4", "MXFP4XFP8", "MXFP8A16", "MXFP8"]
)
def test_packed_checkpoint_reloads_with_equal_logits(tmp_path, token_batches, scheme):
    # MXFP4XFP8's activations come in groups of 128
    wide = {"hidden_size": 128, "intermediate_size": 256} if scheme == "MXFP4XFP8" else {}
    model = _calibrate(
        _bf16_llama(tmp_path, **wide), QuantizationModifier(scheme=scheme), token_batches
    )
    ids = token_batches[0]["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits.float()
    save_compressed(model, tmp_path / "q")
    with torch.no_grad():  # saving leaves the model as it was
        assert torch.equal(model(ids).logits.float(), expected)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        got = reloaded(ids).logits.float()
    assert (got - expected).abs().max().item() <= 1e-4
    packed = {
        "NVFP4": "nvfp4-pack-quantized",
        "MXFP4": "mxfp4-pack-quantized",
        "MXFP8": "mxfp8-quantized",
    }[scheme[:5]]
    assert reloaded.config.quantization_config.quantization_config.format == packed


def test_nvfp4_activations_take_a_calibrated_global_scale(tmp_path, token_batches):
    model = _bf16_llama(tmp_path)
    seen = []
    gate = model.model.layers[0].mlp.gate_proj
    handle = gate.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach()))
    _calibrate(model, QuantizationModifier(scheme="NVFP4"), token_batches)
    handle.remove()
    largest = torch.stack([x.float().abs().max() for x in seen]).max()
    assert torch.allclose(gate.input_global_scale.float(), FP8_E4M3_MAX * 6.0 / largest, rtol=1e-3)
    assert not hasattr(gate, "input_scale")  # its group scales are computed per forward


def test_a_width_the_group_does_not_divide_is_an_error_naming_the_module(tmp_path):
    model = _bf16_llama(tmp_path, intermediate_size=40)  # down_proj reads 40 columns
    with (
        pytest.raises(ValueError, match=r"group_size=16 .*model\.layers\.0\.mlp\.down_proj"),
        create_session() as session,
    ):
        session.initialize(model, [QuantizationModifier(scheme="NVFP4A16")])
    with (
        pytest.raises(ValueError, match=r"group_size=32 .*model\.layers\.0\.mlp\.down_proj"),
        create_session() as session,
    ):
        session.initialize(model, [QuantizationModifier(scheme="MXFP4A16")])


@pytest.mark.parametrize("scheme", ["MXFP8", "NVFP4A16"])
def test_a_float32_model_is_refused_before_any_work(tiny_llama, scheme):
    weight = tiny_llama.model.layers[0].self_attn.q_proj.weight.clone()
    with (
        pytest.raises(
            ValueError, match=r"self_attn\.q_proj.*needs a bfloat16 model.*torch\.float32"
        ),
        create_session() as session,
    ):
        session.initialize(tiny_llama, [QuantizationModifier(scheme=scheme)])
    assert torch.equal(tiny_llama.model.layers[0].self_attn.q_proj.weight, weight)
    assert not hasattr(tiny_llama.model.layers[0].self_attn.q_proj, "quantization_scheme")


def test_gptq_quantizes_mxfp4_onto_the_same_grid(tmp_path, token_batches):
    model = _calibrate(_bf16_llama(tmp_path), GPTQModifier(scheme="MXFP4A16"), token_batches)
    module = model.model.layers[0].mlp.up_proj
    exponents = torch.log2(module.weight_scale.float())
    assert torch.equal(exponents, exponents.round())
    codes = quantize(
        module.weight, module.weight_scale, None, module.quantization_scheme.weights, torch.float32
    )
    assert _on_grid(codes, FP4_E2M1)


@pytest.mark.parametrize(
    ("groups", "match"),
    [
        ({"weights": {"num_bits": 4, "type": "float", "strategy": "channel"}}, "FP4 with strategy"),
        (
            {"weights": {"num_bits": 4, "type": "float", "group_size": 16, "symmetric": False}},
            "symmetric only",
        ),
        (
            {
                "weights": {
                    "num_bits": 4,
                    "type": "float",
                    "strategy": "tensor_group",
                    "group_size": 16,
                },
                "input_activations": {
                    "num_bits": 4,
                    "type": "float",
                    "strategy": "tensor_group",
                    "group_size": 16,
                    "dynamic": True,
                },
            },
            "dynamic 'local' goes with strategy 'tensor_group'",
        ),
    ],
)
def test_fp4_arguments_we_cannot_run_are_refused(groups, match):
    with pytest.raises(ValueError, match=match):
        QuantizationModifier(config_groups={"g": groups})


def test_fp4_in_training_is_refused():
    with pytest.raises(ValueError, match="post-training only"):
        QuantizationModifier(scheme="NVFP4A16", start=0)


def test_fused_projections_share_the_smallest_nvfp4_global_scale(tmp_path, token_batches):
    """vLLM loads q/k/v (and gate/up) into one matrix with one global scale."""
    model = _calibrate(
        _bf16_llama(tmp_path), QuantizationModifier(scheme="NVFP4A16"), token_batches
    )
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for group in (
        (attention.q_proj, attention.k_proj, attention.v_proj),
        (mlp.gate_proj, mlp.up_proj),
    ):
        own = torch.stack([FP8_E4M3_MAX * 6.0 / m.weight.float().abs().max() for m in group])
        for module in group:
            assert torch.allclose(module.weight_global_scale.float(), own.min(), rtol=1e-3)
            codes = quantize(
                module.weight,
                module.weight_scale,
                None,
                module.quantization_scheme.weights,
                dtype=torch.float32,
                global_scale=module.weight_global_scale,
            )
            assert _on_grid(codes, FP4_E2M1)
    # the one whose own scale was largest now has group scales below fp8's max
    assert (attention.q_proj.weight_scale.float() <= FP8_E4M3_MAX).all()
