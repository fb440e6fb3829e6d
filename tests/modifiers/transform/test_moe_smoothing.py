"""SmoothQuant and AWQ on mixture-of-experts models: the post-attention norm smooths into
every expert's (and shared expert's) gate and up projections with the router's weight scaled
too, each expert's up into its down (AWQ); the function and every routing decision stay what
they were until quantization, and AWQ W4A16 checkpoints reload with equal logits."""

import copy
import re

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from pydantic import PrivateAttr
from smoothing_helpers import (
    IDS,
    FunctionProbe,
    captured_logs,
    logits,
    random_ids,
    with_outlier_norms,
)
from transformers import AutoModelForCausalLM

from compressor import oneshot
from compressor.core.events import Event, EventType
from compressor.core.state import State
from compressor.modifiers import (
    AWQModifier,
    HooksMixin,
    QuantizationModifier,
    SmoothQuantModifier,
)
from compressor.modifiers.moe import ExpertMLP, LinearExperts, prepare_experts
from compressor.modifiers.transform.smoothing import quantized_forwards_off
from moe_models import tiny_moe

W4_SYM = {
    "g": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "strategy": "group", "group_size": 16, "symmetric": True},
    }
}


# DeepSeek-V3 as its checkpoints are built: a query low rank (q_a_layernorm) and a dense
# first layer before the sparse ones
DEEPSEEK_MIXED = dict(q_lora_rank=16, first_k_dense_replace=1)


def moe_model(family: str) -> torch.nn.Module:
    if family == "deepseek_v3-mixed":
        return with_outlier_norms(tiny_moe("deepseek_v3", **DEEPSEEK_MIXED))
    return with_outlier_norms(tiny_moe(family))


def logits_and_routes(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits on ``IDS`` and, per sparse block, the experts each token was routed to
    (the ``top_k_index`` the experts module is called with, fused or unfolded)."""
    routes: list[torch.Tensor] = []
    handles = [
        module.register_forward_pre_hook(lambda _m, args: routes.append(args[1].clone()))
        for name, module in model.named_modules()
        if name.endswith("mlp.experts")
    ]
    try:
        return logits(model), routes
    finally:
        for handle in handles:
            handle.remove()


class RoutingProbe(FunctionProbe):
    """``FunctionProbe`` that also records the routing decisions at each layer's end."""

    _routes: list = PrivateAttr(default_factory=list)

    def on_update(self, state: State, event: Event) -> None:
        if event.type_ == EventType.SEQUENTIAL_EPOCH_END:
            with HooksMixin.disable_hooks(), quantized_forwards_off(state.model):
                seen, routes = logits_and_routes(state.model)
            self._logits.append(seen)
            self._routes.append(routes)


def expert_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every routed and shared expert Linear's weight, and the routers', by name, of a copy
    of ``model`` with its experts unfolded."""
    unfolded = copy.deepcopy(model)
    prepare_experts(unfolded, [], "test")
    return {
        name: module.weight.detach().clone()
        for name, module in unfolded.named_modules()
        if ".experts." in name or ".shared_expert" in name or name.endswith("mlp.gate")
        if isinstance(getattr(module, "weight", None), torch.Tensor)
    }


def expert_projections(model: torch.nn.Module) -> dict[str, tuple[str, str, str]]:
    """Each unfolded expert's dotted name and its (gate, up, down) names."""
    return {
        f"{name}.{i}": expert.names
        for name, module in model.named_modules()
        if isinstance(module, LinearExperts)
        for i, expert in enumerate(module)
        if isinstance(expert, ExpertMLP)
    }


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3"])
def test_smoothquant_keeps_function_and_routing_and_smooths_every_expert(family):
    model = moe_model(family)
    before, routes_before = logits_and_routes(model)
    weights = expert_weights(model)
    probe = RoutingProbe()
    with captured_logs() as lines:
        oneshot(model, [SmoothQuantModifier(smoothing_strength=0.8), probe], random_ids())
    assert len(probe._logits) >= 2
    for seen, routes in zip(probe._logits, probe._routes, strict=True):
        torch.testing.assert_close(seen, before, rtol=0, atol=1e-4)
        for got, expected in zip(routes, routes_before, strict=True):
            assert torch.equal(got, expected), "a routing decision changed"
    after, routes_after = logits_and_routes(model)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(routes_after, routes_before, strict=True))
    # every routed and shared expert's gate and up (and each router) took the scales
    current = dict(model.named_modules())
    smoothed = [n for n in weights if n.endswith(("gate_proj", "up_proj", "w1", "w3", "mlp.gate"))]
    assert len(smoothed) >= 2 * (8 * 2 + 1)
    for name in smoothed:
        assert not torch.equal(current[name].weight, weights[name]), f"{name} not smoothed"
    # SmoothQuant's statistics are the norms' outputs: no expert runs on every token for it
    assert not any("all-expert calibration" in line for line in lines)


@pytest.mark.parametrize(
    "family", ["mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "deepseek_v3-mixed"]
)
def test_awq_scales_keep_function_and_routing_and_reach_every_expert(family):
    model = moe_model(family)
    before, routes_before = logits_and_routes(model)
    probe = RoutingProbe()
    awq = AWQModifier(n_grid=6)
    quant = QuantizationModifier(config_groups=W4_SYM, ignore=["lm_head"])
    with captured_logs("DEBUG") as lines:
        oneshot(model, [awq, quant, probe], random_ids())
    assert len(probe._logits) >= 2
    for seen, routes in zip(probe._logits, probe._routes, strict=True):
        torch.testing.assert_close(seen, before, rtol=0, atol=1e-4)
        for got, expected in zip(routes, routes_before, strict=True):
            assert torch.equal(got, expected), "a routing decision changed"
    searched = {line.split()[1].rstrip(":") for line in lines if line.startswith("AWQ model.")}
    for expert, (_, up, _) in expert_projections(model).items():
        assert f"{expert}.{up}" in searched, f"{expert}: its up -> down was not searched"
    layers = {f"model.layers.{i}.post_attention_layernorm" for i in range(2)}
    assert layers <= searched
    if family == "deepseek_v3-mixed":  # the dense layer's MLP and the query low rank too
        assert {"model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_a_layernorm"} <= searched
    assert not any("not smoothed" in line and "experts" in line for line in lines)
    # the experts' up -> down searches ran on every calibration token
    coverage = [
        line for line in lines if re.match(r"AWQModifier: model\.layers\.\d\.mlp\.exp", line)
    ]
    assert coverage and all("each (all-expert calibration)" in line for line in coverage)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_awq_w4a16_checkpoint_reloads_with_equal_logits(family, tmp_path):
    model = moe_model(family)
    awq = AWQModifier(n_grid=6)
    quant = QuantizationModifier(config_groups=W4_SYM, ignore=["lm_head"])
    model = oneshot(model, [awq, quant], random_ids(), output_dir=tmp_path / "out")
    experts = [
        m
        for e in model.modules()
        if isinstance(e, LinearExperts)
        for m in e.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    assert len(experts) == 2 * 8 * 3
    for module in experts:
        args = module.quantization_scheme.weights
        codes = fake_quantize(module.weight, module.weight_scale, None, args)
        assert torch.equal(codes, module.weight)
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            assert not hasattr(module, "quantization_scheme"), name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-4)
    generated = reloaded.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, IDS.shape[1] + 4)


def test_without_all_expert_calibration_awq_names_the_starved_experts():
    model = moe_model("qwen3_moe")
    awq = AWQModifier(n_grid=4, calibrate_all_experts=False, min_expert_tokens=200)
    quant = QuantizationModifier(config_groups=W4_SYM, ignore=["lm_head"])
    with captured_logs() as lines:
        oneshot(model, [awq, quant], random_ids())
    starved = [line for line in lines if line.startswith("AWQModifier:") and "starved" in line]
    assert starved and "calibrate_all_experts: true" in starved[0]


def test_llm_compressor_form_naming_the_router_is_accepted_and_routing_kept():
    model = moe_model("qwen3_moe")
    before, routes_before = logits_and_routes(model)
    mapping = [["re:.*mlp.gate$", "re:.*experts.*.gate_proj$", "re:.*experts.*.up_proj$"],
               "re:.*post_attention_layernorm$"]  # fmt: skip
    oneshot(model, [SmoothQuantModifier(mappings=[mapping])], random_ids())
    after, routes_after = logits_and_routes(model)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(routes_after, routes_before, strict=True))


def test_a_mapping_leaving_out_readers_of_a_sparse_block_is_refused_naming_them():
    mapping = {"smooth_layer": "re:.*post_attention_layernorm$",
               "balance_layers": ["re:.*experts.*.gate_proj$"]}  # fmt: skip
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.0\.up_proj.* also read"):
        oneshot(moe_model("qwen3_moe"), [SmoothQuantModifier(mappings=[mapping])], random_ids())


@pytest.mark.parametrize("modifier", [AWQModifier, SmoothQuantModifier])
def test_a_family_without_mappings_is_named(modifier):
    feature = "AWQ" if modifier is AWQModifier else "SmoothQuant"
    with pytest.raises(
        ValueError, match=rf"no {feature} mappings for GptOssForCausalLM \(model_type='gpt_oss'\)"
    ):
        oneshot(tiny_moe("gpt_oss"), [modifier()], random_ids())


def test_smoothing_the_input_of_experts_kept_fused_is_refused_naming_them():
    # AWQ's own quantizer ignores the experts: they stay fused, yet the shared expert's gate
    # and up read the post-attention norm as they do
    awq = AWQModifier(config_groups=W4_SYM, ignore=["lm_head", "re:.*mlp\\.experts$"])
    with pytest.raises(ValueError, match=r"experts model\.layers\.0\.mlp\.experts stayed fused"):
        oneshot(moe_model("qwen2_moe"), [awq], random_ids())
