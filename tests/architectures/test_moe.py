"""The MoE layout table against tiny models of every family it lists, and the refusal of
expert-like modules it does not know."""

import pytest
import torch

from compressor.architectures.moe import (
    MOE_LAYOUTS,
    UnknownExpertsError,
    check_expert_modules,
    find_moe_blocks,
)
from moe_models import tiny_moe

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layout_names_what_the_model_has(family):
    model = tiny_moe(family)
    blocks = find_moe_blocks(model)
    assert [b.name for b in blocks] == [f"model.layers.{i}.mlp" for i in range(2)]
    config = model.config
    for block in blocks:
        layout = block.layout
        assert family in layout.model_types
        assert block.num_experts == getattr(config, layout.num_experts_key) == 8
        assert block.top_k == getattr(config, layout.top_k_key) == 2
        experts = model.get_submodule(block.experts)
        assert type(experts).__name__ == layout.experts.experts_class
        gate_up = getattr(experts, layout.experts.gate_up)
        down = getattr(experts, layout.experts.down)
        hidden, width = config.hidden_size, down.shape[2 if not layout.experts.transposed else 1]
        if layout.experts.transposed:
            assert gate_up.shape == (8, hidden, 2 * width) and down.shape == (8, width, hidden)
        else:
            assert gate_up.shape == (8, 2 * width, hidden) and down.shape == (8, hidden, width)
        assert hasattr(experts, f"{layout.experts.gate_up}_bias") == layout.experts.bias
        for name in block.exact_modules:
            model.get_submodule(name)  # raises when the table names a missing module
        if block.shared_experts is not None:
            shared = model.get_submodule(block.shared_experts)
            assert any(isinstance(m, torch.nn.Linear) for m in shared.modules())
    assert check_expert_modules(model) == []


def test_layouts_are_unique_per_class_and_model_type():
    classes = [x.experts.experts_class for x in MOE_LAYOUTS]
    model_types = [t for x in MOE_LAYOUTS for t in x.model_types]
    assert len(set(classes)) == len(classes)
    assert len(set(model_types)) == len(model_types)


class WeirdExperts(torch.nn.Module):
    """Experts stored as one 3-D tensor in a layout no table knows."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4, 8, 8))

    def forward(self, x):
        return x @ self.w.sum(0)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(8, 8)
        self.moe = WeirdExperts()
        self.conv = torch.nn.Conv1d(8, 8, 3)


def test_an_unknown_3d_weight_is_refused_naming_the_module_and_the_remedy():
    model = torch.nn.Sequential(Block())
    with pytest.raises(UnknownExpertsError) as error:
        check_expert_modules(model)
    message = str(error.value)
    assert "0.moe (WeirdExperts)" in message and "3-D parameters w" in message
    assert "moe_mappings" in message and "ignore" in message


def test_an_unknown_experts_module_in_skip_is_returned_not_refused():
    model = torch.nn.Sequential(Block())
    assert check_expert_modules(model, skip=["0.moe"]) == ["0.moe"]


def test_a_class_named_expert_with_its_own_weights_is_expert_like():
    class MyExpert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(8))

    model = torch.nn.Sequential(MyExpert())
    with pytest.raises(UnknownExpertsError, match="0 \\(MyExpert\\).*its class name"):
        check_expert_modules(model)
