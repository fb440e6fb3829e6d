"""QuantizationModifier's checkpoint state, kept by whichever pathway runs."""

from __future__ import annotations

import copy

import pytest
import torch

from compressor import create_session
from compressor.modifiers import QuantizationModifier

W4_STATIC_A8 = {
    "g": {
        "weights": {"num_bits": 4, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "dynamic": False},
    }
}


def _train(model, modifier, batches, steps):
    """``steps`` training steps, leaving the modifier unfinalized (as at a checkpoint)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with create_session() as session:
        session.initialize(model, [modifier], optimizer=optimizer)
        for step in range(steps):
            session.batch_start(batch_data=batches[step])
            model(**batches[step]).logits.sum().backward()
            optimizer.step()
            session.batch_end()


def test_a_resumed_training_run_takes_the_saved_schedule_and_ranges(tiny_llama, token_batches):
    fresh = copy.deepcopy(tiny_llama)
    done = QuantizationModifier(config_groups=W4_STATIC_A8, start=0, end=2)
    _train(tiny_llama, done, token_batches, steps=3)
    saved = done.state_dict()
    assert saved["ranges_frozen"] and saved["start_step"] == 0
    down = saved["observers"]["model.layers.0.mlp.down_proj|input"]
    assert down["batches"] == 2

    resumed = QuantizationModifier(config_groups=W4_STATIC_A8, start=0, end=2)
    _train(fresh, resumed, token_batches[3:], steps=1)  # another batch, its own range
    resumed.load_state_dict(saved)
    again = resumed.state_dict()
    assert again["ranges_frozen"]
    assert again["observers"].keys() == saved["observers"].keys()
    for key, observed in saved["observers"].items():
        assert again["observers"][key]["batches"] == observed["batches"]
        assert torch.equal(again["observers"][key]["lo"], observed["lo"])


def test_ranges_this_run_does_not_observe_are_an_error(tiny_llama, token_batches):
    modifier = QuantizationModifier(config_groups=W4_STATIC_A8, start=0)
    _train(tiny_llama, modifier, token_batches, steps=1)
    saved = {"observers": {"model.layers.9.mlp.down_proj|input": {}}}
    with pytest.raises(ValueError, match=r"QuantizationModifier: .*layers\.9"):
        modifier.load_state_dict(saved)
    never_started = QuantizationModifier(config_groups=W4_STATIC_A8, start=5)
    _train(copy.deepcopy(tiny_llama), never_started, token_batches, steps=1)
    assert never_started.state_dict() == {"start_step": 0, "ranges_frozen": False, "observers": {}}
    with pytest.raises(ValueError, match="layers.9"):
        never_started.load_state_dict(saved)


def test_post_training_state_holds_the_calibrated_ranges(tiny_llama, token_batches):
    modifier = QuantizationModifier(config_groups=W4_STATIC_A8, ignore=["lm_head"])
    with create_session() as session:
        session.initialize(tiny_llama, [modifier])
        session.calibration_epoch_start()
        with torch.no_grad():
            for batch in token_batches:
                tiny_llama(**batch)
        session.calibration_epoch_end()
        session.finalize()
    saved = modifier.state_dict()
    assert saved["start_step"] == 0 and not saved["ranges_frozen"]
    assert len(saved["observers"]) == 14  # each Linear's input, lm_head ignored
    assert {o["batches"] for o in saved["observers"].values()} == {len(token_batches)}
