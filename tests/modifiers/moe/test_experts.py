"""Fused experts unfolded into per-expert Linears and folded back: the weight split on its
own, and the unfolded module against the fused one on tiny models of every family."""

import pytest
import torch
from loguru import logger

from compressor.architectures.moe import UNFOLDED_MARKER, ExpertsLayout, check_expert_modules
from compressor.modifiers.moe import (
    LinearExperts,
    expert_matrices,
    fold_experts,
    fused_matrices,
    prepare_experts,
)
from moe_models import tiny_moe


@pytest.fixture
def logged():
    """Every message logged (INFO and up) during the test, one string each."""
    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(str(m)), level="INFO")
    yield messages
    logger.remove(handle)


LAYOUTS = [
    ExpertsLayout("A"),
    ExpertsLayout("B", transposed=True),
    ExpertsLayout("C", interleaved=True, bias=True),
    ExpertsLayout("D", transposed=True, interleaved=True, bias=True),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: x.experts_class)
def test_the_split_reproduces_the_fused_products_and_folds_back(layout):
    gen = torch.Generator().manual_seed(0)
    experts, hidden, width = 3, 8, 6
    if layout.transposed:
        gate_up = torch.randn(experts, hidden, 2 * width, generator=gen)
        down = torch.randn(experts, width, hidden, generator=gen)
    else:
        gate_up = torch.randn(experts, 2 * width, hidden, generator=gen)
        down = torch.randn(experts, hidden, width, generator=gen)
    biases = (
        (
            torch.randn(experts, 2 * width, generator=gen),
            torch.randn(experts, hidden, generator=gen),
        )
        if layout.bias
        else (None, None)
    )
    x = torch.randn(5, hidden, generator=gen)
    split = [expert_matrices(layout, gate_up, down, i, *biases) for i in range(experts)]
    for i, m in enumerate(split):
        fused_out = x @ gate_up[i] if layout.transposed else x @ gate_up[i].T
        if layout.bias:
            fused_out = fused_out + biases[0][i]
        gate_ref = fused_out[:, 0::2] if layout.interleaved else fused_out[:, :width]
        up_ref = fused_out[:, 1::2] if layout.interleaved else fused_out[:, width:]
        gate = x @ m.gate.T + (m.gate_bias if layout.bias else 0)
        up = x @ m.up.T + (m.up_bias if layout.bias else 0)
        torch.testing.assert_close(gate, gate_ref)
        torch.testing.assert_close(up, up_ref)
        assert m.down.shape == (hidden, width)
    back = fused_matrices(layout, split)
    assert torch.equal(back[0], gate_up) and torch.equal(back[1], down)
    if layout.bias:
        assert torch.equal(back[2], biases[0]) and torch.equal(back[3], biases[1])


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_unfolded_experts_compute_what_the_fused_ones_do_and_fold_back(family):
    model = tiny_moe(family)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        fused = {k: v.clone() for k, v in model.state_dict().items()}
        prepared = prepare_experts(model, [], "test")
        assert len(prepared.unfolded) == 2
        unfolded = model.get_submodule(prepared.experts[0])
        assert isinstance(unfolded, LinearExperts) and len(unfolded) == 8
        assert getattr(unfolded, UNFOLDED_MARKER) is True
        assert check_expert_modules(model) == []  # the unfolded experts are known
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=0)
        # every token through every expert changes nothing the layer outputs
        for name in prepared.experts:
            model.get_submodule(name).all_experts_requests += 1
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=0)
        for name in prepared.experts:
            model.get_submodule(name).all_experts_requests -= 1
        assert prepare_experts(model, [], "test").unfolded == ()  # idempotent
        assert fold_experts(model) == list(prepared.experts)
        assert model.state_dict().keys() == fused.keys()
        for key, value in model.state_dict().items():
            assert torch.equal(value, fused[key]), key
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=0)


def test_names_follow_the_family_checkpoint():
    model = tiny_moe("mixtral")
    prepare_experts(model, [], "test")
    keys = set(model.state_dict())
    assert "model.layers.0.mlp.experts.7.w1.weight" in keys
    assert "model.layers.0.mlp.experts.7.w3.weight" in keys
    assert "model.layers.0.mlp.experts.7.w2.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)


def test_ignored_experts_stay_fused_and_are_logged(logged):
    model = tiny_moe("qwen3_moe")
    prepared = prepare_experts(model, ["re:.*layers\\.1\\.mlp\\.experts$"], "test")
    assert prepared.unfolded == ("model.layers.0.mlp.experts",)
    assert prepared.skipped == ("model.layers.1.mlp.experts",)
    assert any("experts model.layers.1.mlp.experts left in full precision" in m for m in logged)


def test_gpt_oss_experts_have_no_per_expert_checkpoint_and_are_refused():
    model = tiny_moe("gpt_oss")
    with pytest.raises(ValueError, match="model.layers.0.mlp.experts \\(GptOssExperts\\).*ignore"):
        prepare_experts(model, [], "test")
    prepared = prepare_experts(model, ["re:.*experts$"], "test")
    assert prepared.unfolded == () and len(prepared.skipped) == 2
