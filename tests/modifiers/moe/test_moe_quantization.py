"""Mixture-of-experts models quantized whole: every expert's matrices get their own scales,
the routing stays exact, the checkpoint reloads in transformers' own layout, and nothing
that looks like experts is left uncompressed in silence."""

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from datasets import Dataset
from loguru import logger
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from compressor import oneshot
from compressor.architectures.moe import UnknownExpertsError
from compressor.modifiers import GPTQModifier, QuantizationModifier
from compressor.modifiers.moe import LinearExperts
from moe_models import MOE_FAMILIES, tiny_moe


@pytest.fixture
def logged():
    """Every message logged (INFO and up) during the test, one string each."""
    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(str(m)), level="INFO")
    yield messages
    logger.remove(handle)


W4_GROUP16 = {
    "targets": ["Linear"],
    "weights": {"num_bits": 4, "strategy": "group", "group_size": 16, "symmetric": True},
}
# the per-expert Linear names of each family's Hub checkpoint (after save_pretrained)
CHECKPOINT_EXPERT = {
    "mixtral": "model.layers.0.block_sparse_moe.experts.7.w2.weight_packed",
    "qwen2_moe": "model.layers.0.mlp.experts.7.down_proj.weight_packed",
    "qwen3_moe": "model.layers.0.mlp.experts.7.down_proj.weight_packed",
    "deepseek_v3": "model.layers.0.mlp.experts.7.down_proj.weight_packed",
}


def calibration(rows=4, length=16):
    gen = torch.Generator().manual_seed(1)
    return Dataset.from_dict({"input_ids": torch.randint(0, 128, (rows, length), generator=gen)})


def expert_linears(model):
    return {
        f"{name}.{n}": m
        for name, experts in model.named_modules()
        if isinstance(experts, LinearExperts)
        for n, m in experts.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def on_grid(module):
    args = module.quantization_scheme.weights
    zero = getattr(module, "weight_zero_point", None)
    return torch.equal(fake_quantize(module.weight, module.weight_scale, zero, args), module.weight)


def router_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".gate." in n + "."}


def check_compressed_and_reloaded(model, family, output, routers):
    experts = expert_linears(model)
    assert len(experts) == 2 * 8 * 3
    for name, module in experts.items():
        assert module.quantization_scheme.weights.num_bits == 4, name
        assert on_grid(module), name
        assert module.weight_scale.shape == (module.out_features, module.in_features // 16)
    for name, weight in router_weights(model).items():
        assert torch.equal(weight, routers[name]), f"router {name} changed"
    for name, module in model.named_modules():
        if name.endswith(("mlp.gate", "shared_expert_gate")):
            assert not hasattr(module, "quantization_scheme"), name
    with safe_open(str(output / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert CHECKPOINT_EXPERT[family] in keys
    assert not any("gate_up_proj" in k for k in keys)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(output).eval()
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-4, rtol=0)
        generated = reloaded.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 16)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_rtn_w4a16_quantizes_every_expert_and_reloads(family, tmp_path):
    model = tiny_moe(family)
    routers = router_weights(model)
    modifier = QuantizationModifier(config_groups={"g": W4_GROUP16}, ignore=["lm_head"])
    model = oneshot(model, [modifier], output_dir=tmp_path / "out")
    check_compressed_and_reloaded(model, family, tmp_path / "out", routers)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gptq_w4a16_quantizes_every_expert_and_reloads(family, tmp_path):
    model = tiny_moe(family)
    routers = router_weights(model)
    modifier = GPTQModifier(config_groups={"g": W4_GROUP16}, ignore=["lm_head"])
    model = oneshot(
        model,
        [modifier],
        dataset=calibration(),
        output_dir=tmp_path / "out",
        num_calibration_samples=4,
    )
    check_compressed_and_reloaded(model, family, tmp_path / "out", routers)
    tokens = 4 * 16
    for name in expert_linears(model):
        assert modifier.hessian_tokens[name] >= tokens, name


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_activations_of_every_expert_are_quantized(dynamic, tmp_path, logged):
    model = tiny_moe("qwen3_moe")
    modifier = QuantizationModifier(scheme="FP8_DYNAMIC" if dynamic else "FP8", ignore=["lm_head"])
    model = oneshot(
        model,
        [modifier],
        dataset=None if dynamic else calibration(),
        output_dir=tmp_path / "out",
        num_calibration_samples=4,
    )
    experts = expert_linears(model)
    for name, module in experts.items():
        assert module.quantization_scheme.input_activations.dynamic is dynamic, name
        if not dynamic:  # every expert saw tokens (all-expert calibration) and has a range
            assert module.input_scale.item() > 0, name
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for name in experts:
        assert f"{name}.weight_scale" in keys
        assert (f"{name}.input_scale" in keys) is not dynamic
    # transformers reloads the experts' weights exactly, into its fused layout, and says
    # nothing of their activations: the save warns about it
    assert any("expert Linear(s) quantize activations" in m for m in logged)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for layer in range(2):
        fused = reloaded.model.layers[layer].mlp.experts
        for index in range(8):
            expert = model.model.layers[layer].mlp.experts[index]
            gate, up, down = expert.projections()
            torch.testing.assert_close(
                fused.gate_up_proj[index], torch.cat([gate.weight, up.weight])
            )
            torch.testing.assert_close(fused.down_proj[index], down.weight)


def test_gptq_without_all_expert_calibration_names_the_starved_experts(logged):
    model = tiny_moe("qwen3_moe")
    modifier = GPTQModifier(
        config_groups={"g": W4_GROUP16}, ignore=["lm_head"], calibrate_all_experts=False
    )
    oneshot(model, [modifier], dataset=calibration(2, 8), num_calibration_samples=2)
    warnings = [m for m in logged if "starved expert(s)" in m]
    assert warnings, "no warning about starved experts"
    # 16 tokens routed top-2 over 8 experts: every expert saw fewer than its 32 input columns
    assert "model.layers.0.mlp.experts.0 (" in warnings[0]
    assert "calibrate_all_experts: true" in warnings[0]
    routed = {name: t for name, t in modifier.hessian_tokens.items() if ".experts." in name}
    assert routed and max(routed.values()) < 16


class OpaqueExperts(torch.nn.Module):
    """Experts in a layout no table knows: one 3-D tensor."""

    def __init__(self, hidden):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, hidden, hidden) * 0.01)

    def forward(self, x):
        return x + x @ self.weight.mean(0)


def with_opaque_experts():
    model = tiny_moe("qwen3_moe")
    model.model.layers[0].opaque = OpaqueExperts(32)
    return model


@pytest.mark.parametrize("modifier_class", [QuantizationModifier, GPTQModifier])
def test_an_unknown_expert_layout_is_refused_before_any_work(modifier_class):
    model = with_opaque_experts()
    modifier = modifier_class(config_groups={"g": W4_GROUP16}, ignore=["lm_head"])
    with pytest.raises(UnknownExpertsError, match="model.layers.0.opaque \\(OpaqueExperts\\)"):
        oneshot(model, [modifier], dataset=calibration(), num_calibration_samples=4)
    assert not any(hasattr(m, "quantization_scheme") for m in model.modules())


def test_an_unknown_expert_layout_in_ignore_is_skipped_with_a_log(logged):
    model = with_opaque_experts()
    modifier = QuantizationModifier(
        config_groups={"g": W4_GROUP16}, ignore=["lm_head", "model.layers.0.opaque"]
    )
    model = oneshot(model, [modifier])
    assert any("model.layers.0.opaque left in full precision" in m for m in logged)
    assert len(expert_linears(model)) == 48


def with_custom_family():
    """A tiny Qwen3-MoE whose sparse blocks and experts are classes no table lists."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

    class MyExperts(qwen3.Qwen3MoeExperts):
        pass

    class MyBlock(qwen3.Qwen3MoeSparseMoeBlock):
        pass

    model = tiny_moe("qwen3_moe")
    for layer in model.model.layers:
        layer.mlp.__class__ = MyBlock
        layer.mlp.experts.__class__ = MyExperts
    return model


CUSTOM_MAPPING = {
    "family": "mine",
    "model_types": ["mine"],
    "block_class": "MyBlock",
    "experts": {"experts_class": "MyExperts", "checkpoint_names": ["w1", "w3", "w2"]},
}


def test_a_family_the_table_lacks_is_described_by_moe_mappings():
    model = with_custom_family()
    modifier = GPTQModifier(config_groups={"g": W4_GROUP16}, ignore=["lm_head"])
    with pytest.raises(UnknownExpertsError, match="model.layers.0.mlp.experts \\(MyExperts\\)"):
        oneshot(model, [modifier], dataset=calibration(), num_calibration_samples=4)
    modifier = GPTQModifier(
        config_groups={"g": W4_GROUP16}, ignore=["lm_head"], moe_mappings=[CUSTOM_MAPPING]
    )
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(ids).logits
    model = oneshot(model, [modifier], dataset=calibration(), num_calibration_samples=4)
    experts = expert_linears(model)
    assert len(experts) == 48 and all(name.endswith(("w1", "w2", "w3")) for name in experts)
    assert all(on_grid(module) for module in experts.values())
    with torch.no_grad():  # quantized, not broken: close to the original
        assert (model(ids).logits - reference).abs().max() < 1.0
