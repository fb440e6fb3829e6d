"""CalibrationTraits: what a modifier lets the calibration pipelines do."""

import dataclasses

import pytest

from compressor.modifiers import GPTQModifier, QuantizationModifier
from compressor.modifiers.base import CalibrationTraits
from recording import RecordingModifier


def test_a_modifier_allows_no_shortcut_unless_it_says_so():
    """The defaults are the conservative answers: no offloaded models, outputs read, batches
    kept apart, layers calibrated whole."""
    assert RecordingModifier().calibration_traits() == CalibrationTraits(
        supports_offloaded_models=False,
        reads_outputs=True,
        merges_batches=False,
        in_stages=False,
        reduces_across_ranks=False,
    )


def test_traits_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CalibrationTraits().reads_outputs = False  # type: ignore[misc]


@pytest.mark.parametrize("true_sequential", [True, False])
def test_gptq_and_quantization_declare_their_traits(true_sequential):
    gptq = GPTQModifier(scheme="W4A16", targets=["Linear"], true_sequential=true_sequential)
    assert gptq.calibration_traits() == CalibrationTraits(
        supports_offloaded_models=True,
        reads_outputs=False,
        merges_batches=True,
        in_stages=true_sequential,
        reduces_across_ranks=True,
    )
    quantization = QuantizationModifier(
        scheme="W4A16", targets=["Linear"], true_sequential=true_sequential
    )
    assert quantization.calibration_traits() == CalibrationTraits(
        supports_offloaded_models=True,
        reads_outputs=False,
        merges_batches=True,
        in_stages=true_sequential,
        reduces_across_ranks=True,
        compresses_lightly=True,  # weights rounded to observed scales, no solve
    )
    training = QuantizationModifier(scheme="W4A16", targets=["Linear"], start=0)
    assert not training.calibration_traits().compresses_lightly


def test_quantization_merges_batches_unless_a_forward_s_batches_matter():
    """Post-training static ranges observed in full precision: extremes are the same over
    stacked batches, and a per-batch range (moving average, last batch) splits them apart
    again; not merged: a cache quantized while it is observed, a dynamic scale per forward,
    or training. Static outputs or the cache are read past the inputs."""
    kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
    outputs = {"g": {"targets": ["Linear"], "output_activations": {"num_bits": 8}}}
    per_forward = {"num_bits": 8, "strategy": "tensor", "dynamic": True}
    dynamic = {"g": {"targets": ["Linear"], "input_activations": per_forward}}
    for modifier, merges, reads in (
        (QuantizationModifier(config_groups=_static_inputs("static_minmax")), True, False),
        (QuantizationModifier(config_groups=outputs), True, True),
        (QuantizationModifier(config_groups=_static_inputs("moving_average")), True, False),
        (QuantizationModifier(config_groups=_static_inputs("minmax")), True, False),
        (QuantizationModifier(scheme="W8A8", targets=["Linear"], kv_cache_scheme=kv), False, True),
        (QuantizationModifier(config_groups=dynamic), False, False),
        (QuantizationModifier(config_groups=_static_inputs("static_minmax"), start=0), False, True),
    ):
        traits = modifier.calibration_traits()
        assert (traits.merges_batches, traits.reads_outputs) == (merges, reads), modifier


def _static_inputs(observer: str) -> dict:
    args = {"num_bits": 8, "strategy": "tensor", "dynamic": False, "observer": observer}
    return {"g": {"targets": ["Linear"], "weights": {"num_bits": 8}, "input_activations": args}}


def test_modifiers_that_calibrate_say_whether_ranks_can_share_the_data():
    """Every registered modifier that needs calibration data reduces its statistics over the
    ranks of a process group; a moving average of ranges cannot be (it depends on batch
    order), so oneshot refuses it there."""
    from compressor.modifiers import (
        AWQModifier,
        LayerReductionModifier,
        SmoothQuantModifier,
        SparseGPTModifier,
        SparsePruningModifier,
        WandaPruningModifier,
    )

    calibrating = [
        GPTQModifier(config_groups=_static_inputs("static_minmax")),
        QuantizationModifier(config_groups=_static_inputs("static_minmax")),
        SparseGPTModifier(sparsity=0.5),
        WandaPruningModifier(sparsity=0.5),
        SparsePruningModifier(density=0.5, method="activation", targets=["Linear"]),
        SmoothQuantModifier(),
        AWQModifier(),
        LayerReductionModifier(strategy="angular", num_layers_to_drop=1),
    ]
    for modifier in calibrating:
        assert modifier.requires_calibration_data(), type(modifier).__name__
        assert modifier.calibration_traits().reduces_across_ranks, type(modifier).__name__
    per_batch = ("moving_average", "minmax", "memoryless_minmax")  # llm-compressor's meanings
    for moving in (
        *(GPTQModifier(config_groups=_static_inputs(name)) for name in per_batch),
        *(QuantizationModifier(config_groups=_static_inputs(name)) for name in per_batch),
    ):
        assert moving.requires_calibration_data()
        assert not moving.calibration_traits().reduces_across_ranks


@pytest.mark.parametrize("modifier_cls", [QuantizationModifier, GPTQModifier])
def test_per_batch_ranges_keep_batches_apart_on_models_with_experts(modifier_cls):
    """An expert sees the tokens routed to it from every row of a stacked forward, so its
    inputs cannot be split back into batches: a per-batch range keeps them apart there."""
    from compressor import create_session
    from moe_models import tiny_moe

    for observer, merges in (("minmax", False), ("static_minmax", True)):
        modifier = modifier_cls(config_groups=_static_inputs(observer), ignore=["lm_head"])
        with create_session() as session:
            session.initialize(tiny_moe("mixtral"), [modifier])
            assert modifier.calibration_traits().merges_batches is merges, observer
