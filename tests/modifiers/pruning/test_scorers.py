import typing

import pytest
import torch
from pruning_helpers import train, zero_fraction

from compressor import CompressionSession
from compressor.modifiers import SparsePruningModifier
from compressor.modifiers.pruning.base import SCORERS, PruningMethod
from compressor.modifiers.pruning.scorers import L1Scorer, Scorer


def test_every_method_is_a_scorer_and_only_calibrated_ones_need_data():
    assert set(SCORERS) == set(typing.get_args(PruningMethod))
    for method, scorer in SCORERS.items():
        assert issubclass(scorer, Scorer)
        schedule = {"start": 0} if scorer.own_schedule else {}  # snip_momentum trains
        modifier = SparsePruningModifier(density=0.5, method=method, **schedule)
        assert modifier.requires_calibration_data() is scorer.calibrated


def test_the_scorer_exists_from_initialize_on(tiny_llama):
    modifier = SparsePruningModifier(density=0.5, targets=["re:.*mlp\\.up_proj"])
    with pytest.raises(RuntimeError, match="no scorer before initialize"):
        _ = modifier.scorer
    CompressionSession().initialize(model=tiny_llama, recipe=[modifier])
    assert type(modifier.scorer) is L1Scorer


def test_l1_chooses_no_masks_again_at_an_unchanged_density(tiny_llama, monkeypatch):
    calls = []
    apply = L1Scorer.apply
    monkeypatch.setattr(L1Scorer, "apply", lambda self, d: (calls.append(d), apply(self, d)))
    opt = torch.optim.SGD(tiny_llama.parameters(), lr=0.1)
    modifier = SparsePruningModifier(density=0.5, start=0, update=1, targets=["re:.*up_proj"])
    session = CompressionSession()
    session.initialize(model=tiny_llama, recipe=[modifier], optimizer=opt)
    batches = [{"input_ids": torch.randint(0, 128, (2, 8))} for _ in range(4)]
    train(tiny_llama, session, opt, batches)
    assert calls == [0.5]  # at start; every later step keeps the density, and the masks
    assert zero_fraction(tiny_llama.model.layers[0].mlp.up_proj.weight) == pytest.approx(0.5)
    session.finalize()
    assert calls == [0.5, 0.5]  # the final masks, at end


@torch.no_grad()
def test_activation_chooses_a_layers_masks_once_a_pipeline_has_calibrated_it(
    tiny_llama, token_batches
):
    modifier = SparsePruningModifier(
        density=0.5, method="activation", targets=["re:.*mlp\\.down_proj"]
    )
    session = CompressionSession()
    session.initialize(model=tiny_llama, recipe=[modifier])
    first, second = (layer.mlp.down_proj for layer in tiny_llama.model.layers)
    session.calibration_epoch_start()
    for batch in token_batches:
        tiny_llama(**batch)
    session.sequential_epoch_end(tiny_llama.model.layers[0])
    assert zero_fraction(first.weight) == 0.5 and zero_fraction(second.weight) == 0.0
    session.calibration_epoch_end()
    assert zero_fraction(second.weight) == 0.5
    session.finalize()
    assert modifier.num_hooks == 0
