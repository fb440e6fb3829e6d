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
    quantization = QuantizationModifier(scheme="W4A16", targets=["Linear"])
    assert quantization.calibration_traits() == CalibrationTraits(
        supports_offloaded_models=True,
        reads_outputs=False,
        merges_batches=True,
        reduces_across_ranks=True,
    )


def test_quantization_merges_batches_only_when_its_ranges_are_extremes():
    """Post-training static ranges are extremes observed in full precision: stacked batches
    give the same; not a moving average, a cache quantized while it is observed, a dynamic
    scale per forward, or training. Static outputs or the cache are read past the inputs."""
    kv = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
    outputs = {"g": {"targets": ["Linear"], "output_activations": {"num_bits": 8}}}
    per_forward = {"num_bits": 8, "strategy": "tensor", "dynamic": True}
    dynamic = {"g": {"targets": ["Linear"], "input_activations": per_forward}}
    for modifier, merges, reads in (
        (QuantizationModifier(config_groups=_static_inputs("minmax")), True, False),
        (QuantizationModifier(config_groups=outputs), True, True),
        (QuantizationModifier(config_groups=_static_inputs("moving_average")), False, False),
        (QuantizationModifier(scheme="W8A8", targets=["Linear"], kv_cache_scheme=kv), False, True),
        (QuantizationModifier(config_groups=dynamic), False, False),
        (QuantizationModifier(config_groups=_static_inputs("minmax"), start=0), False, True),
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
        GPTQModifier(config_groups=_static_inputs("minmax")),
        QuantizationModifier(config_groups=_static_inputs("minmax")),
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
    for moving in (
        GPTQModifier(config_groups=_static_inputs("moving_average")),
        QuantizationModifier(config_groups=_static_inputs("moving_average")),
    ):
        assert moving.requires_calibration_data()
        assert not moving.calibration_traits().reduces_across_ranks
