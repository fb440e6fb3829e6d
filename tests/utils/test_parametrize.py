"""Parametrizations that keep the parameter object and its gradient accumulator (DDP's hooks)."""

import torch

from compressor.utils.parametrize import register_parametrization, remove_parametrizations


class Double(torch.nn.Module):
    def forward(self, weight):
        return weight * 2.0


def _accumulator(param):
    return param.expand_as(param).grad_fn.next_functions[0][0]


def test_hooks_on_the_gradient_accumulator_survive_registration_and_removal():
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    weight = linear.weight
    fired = []
    accumulator = _accumulator(weight)  # held, as DDP holds the accumulators it hooks
    accumulator.register_hook(lambda *_: fired.append(1))
    register_parametrization(linear, "weight", Double())
    assert linear.parametrizations.weight.original is weight
    linear(torch.randn(2, 4)).sum().backward()
    assert fired == [1]  # torch's own register_parametrization gives a new accumulator
    doubled = linear.weight.detach().clone()
    remove_parametrizations(linear, "weight", leave_parametrized=True)
    assert linear.weight is weight and torch.equal(weight.detach(), doubled)
    linear(torch.randn(2, 4)).sum().backward()
    assert fired == [1, 1]
    assert _accumulator(weight) is accumulator


def test_qat_and_topk_scores_on_one_weight_are_refused_by_name(tiny_llama):
    """Removing one parametrization removes all on a weight, so a second one is an error that
    names the module, rather than one modifier silently ending the other."""
    import pytest

    from compressor import CompressionSession
    from compressor.modifiers import QuantizationModifier, SparsePruningModifier

    up = ["re:.*layers\\.0\\.mlp\\.up_proj$"]
    recipe = [
        QuantizationModifier(scheme="W8A8", targets=up, start=0),
        SparsePruningModifier(density=0.5, method="topk", start=0, end=4, targets=up),
    ]
    session = CompressionSession()
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight is already"):
        session.initialize(model=tiny_llama.train(), recipe=recipe)
        session.batch_start(global_step=0)
