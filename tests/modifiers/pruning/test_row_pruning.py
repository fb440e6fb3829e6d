import pytest
import torch
from pruning_helpers import calibrate, train

from compressor import CompressionSession
from compressor.modifiers import RowPruningModifier
from compressor.modifiers.pruning.removal import remove_pruned_structure


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_one_shot_rows_shrink_to_the_masked_outputs_and_reload(tiny_llama, token_batches, tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama
    dense = _count(model)
    modifier = RowPruningModifier(density=0.25, shrink=False)
    session = CompressionSession()
    session.initialize(model=model, recipe=[modifier])
    calibrate(model, session, token_batches)
    session.finalize()
    mlp = model.model.layers[0].mlp
    zero_rows = (mlp.gate_proj.weight == 0).all(1)
    assert int(zero_rows.sum()) == 48  # 75% of 64 rows, the same rows in up and down
    assert torch.equal(zero_rows, (mlp.up_proj.weight == 0).all(1))
    assert torch.equal(zero_rows, (mlp.down_proj.weight == 0).all(0))
    masked = _logits(model, token_batches[0])

    assert remove_pruned_structure(model) == {"intermediate_size": 16}
    assert mlp.gate_proj.weight.shape == (16, 32) and mlp.down_proj.weight.shape == (32, 16)
    # 48 rows x (gate + up + down) x hidden 32, in each of 2 layers
    assert dense - _count(model) == 2 * 48 * 3 * 32
    torch.testing.assert_close(_logits(model, token_batches[0]), masked, rtol=0, atol=1e-5)

    model.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.intermediate_size == 16
    assert torch.equal(_logits(again, token_batches[0]), _logits(model, token_batches[0]))


def test_rows_pruned_in_training_shrink_at_finalize(tiny_llama):
    model = tiny_llama
    gen = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 128, (2, 12), generator=gen)} for _ in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    modifier = RowPruningModifier(density=0.5, start=0, end=2, method="topk")
    session = CompressionSession()
    session.initialize(model=model, recipe=[modifier], optimizer=opt)
    train(model, session, opt, batches)
    # the effective (masked) model after training, for comparison with the cleaned one
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mlp = model.model.layers[1].mlp
    assert int((mlp.up_proj.weight == 0).all(1).sum()) == 32
    masked = _logits(model.eval(), batches[0])
    session.finalize()
    assert model.config.intermediate_size == 32 and mlp.down_proj.in_features == 32
    torch.testing.assert_close(_logits(model, batches[0]), masked, rtol=0, atol=1e-5)
    assert len(state) == len(model.state_dict())


def test_targets_limit_the_layers_and_uneven_pruning_is_refused(tiny_llama, token_batches):
    model = tiny_llama
    # layer 0 at 32 rows, layer 1 at 64: the config cannot say both, so it fails early
    with pytest.raises(ValueError, match=r"leave out \['model.layers.1.mlp.gate_proj'\]"):
        CompressionSession().initialize(
            model=model, recipe=[RowPruningModifier(density=0.5, targets=["re:.*layers\\.0\\..*"])]
        )
    modifier = RowPruningModifier(density=0.5, targets=["re:.*layers\\.0\\..*"], shrink=False)
    session = CompressionSession()
    session.initialize(model=model, recipe=[modifier])
    calibrate(model, session, token_batches)
    session.finalize()
    assert (model.model.layers[0].mlp.up_proj.weight == 0).all(1).sum() == 32
    assert (model.model.layers[1].mlp.up_proj.weight == 0).all(1).sum() == 0


def test_remove_pruned_structure_keeps_layers_uniform(tiny_llama, token_batches):
    model = tiny_llama
    with torch.no_grad():
        for layer, rows in zip(model.model.layers, ([1, 2, 3], [5]), strict=True):
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
                proj.weight[rows] = 0
            layer.mlp.down_proj.weight[:, rows] = 0
    masked = _logits(model, token_batches[0])
    assert remove_pruned_structure(model) == {"intermediate_size": 63}
    torch.testing.assert_close(_logits(model, token_batches[0]), masked, rtol=0, atol=1e-5)
