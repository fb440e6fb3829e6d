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
        supports_offloaded_models=False, reads_outputs=True, merges_batches=False, in_stages=False
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
    )
    quantization = QuantizationModifier(scheme="W4A16", targets=["Linear"])
    assert quantization.calibration_traits() == CalibrationTraits(supports_offloaded_models=True)
