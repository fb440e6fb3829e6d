"""Row and head pruning on Qwen3, whose attention normalises every query and key head with
``q_norm`` / ``k_norm`` (one weight of ``head_dim`` values, shared by all heads)."""

import pytest
import torch
from pruning_helpers import calibrate

from compressor import CompressionSession
from compressor.modifiers import HeadPruningModifier, RowPruningModifier

HEAD_DIM = 16  # with 4 heads the attention is 64 wide over a hidden size of 32


def _tiny_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # per-head norms that are not all ones, so they take part
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _prune_save_reload(model, modifier, batches, tmp_path):
    """Prune, compare the shrunk model with the masked one, save, reload and compare again;
    the reloaded model is returned."""
    from transformers import Qwen3ForCausalLM

    session = CompressionSession()
    session.initialize(model=model, recipe=[modifier])
    calibrate(model, session, batches)
    masked = _logits(model, batches[0])
    session.finalize()
    torch.testing.assert_close(_logits(model, batches[0]), masked, rtol=0, atol=1e-5)

    model.save_pretrained(tmp_path)
    again = Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(again, batches[0]), _logits(model, batches[0]))
    return again


def test_qwen3_head_pruning_removes_key_value_groups_and_keeps_the_head_norms(
    token_batches, tmp_path
):
    model = _tiny_qwen3()
    dense = _count(model)
    q_norm = model.model.layers[0].self_attn.q_norm.weight.clone()
    again = _prune_save_reload(model, HeadPruningModifier(density=0.5), token_batches, tmp_path)

    # half the key-value groups: 1 kv head and the 2 query heads that read it
    assert again.config.num_attention_heads == 2 and again.config.num_key_value_heads == 1
    attn = again.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (2 * HEAD_DIM, 32)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (HEAD_DIM, 32)
    assert attn.o_proj.weight.shape == (32, 2 * HEAD_DIM)
    # the head norms act within a head, so they are untouched
    assert torch.equal(attn.q_norm.weight, q_norm) and attn.k_norm.weight.shape == (HEAD_DIM,)
    # per layer: 2 query heads in q and o, 1 kv head in k and v, each HEAD_DIM x hidden 32
    assert dense - _count(again) == 2 * (2 * 2 + 2 * 1) * HEAD_DIM * 32


def test_qwen3_row_pruning_removes_mlp_rows(token_batches, tmp_path):
    model = _tiny_qwen3()
    dense = _count(model)
    again = _prune_save_reload(model, RowPruningModifier(density=0.25), token_batches, tmp_path)

    assert again.config.intermediate_size == 16
    mlp = again.model.layers[1].mlp
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (16, 32)
    assert mlp.down_proj.weight.shape == (32, 16)
    # 48 rows x (gate + up + down) x hidden 32, in each of 2 layers
    assert dense - _count(again) == 2 * 48 * 3 * 32


@pytest.mark.parametrize("modifier", [HeadPruningModifier, RowPruningModifier])
def test_qwen3_masked_units_are_zero_in_every_coupled_projection(modifier, token_batches):
    model = _tiny_qwen3()
    session = CompressionSession()
    session.initialize(model=model, recipe=[modifier(density=0.5, shrink=False)])
    calibrate(model, session, token_batches)
    session.finalize()
    layer = model.model.layers[0]
    if modifier is HeadPruningModifier:
        zero_q = (layer.self_attn.q_proj.weight.view(4, -1) == 0).all(1)
        zero_o = (layer.self_attn.o_proj.weight.view(32, 4, HEAD_DIM) == 0).all(0).all(1)
        assert int(zero_q.sum()) == 2 and torch.equal(zero_q, zero_o)
    else:
        zero_rows = (layer.mlp.gate_proj.weight == 0).all(1)
        assert int(zero_rows.sum()) == 32
        assert torch.equal(zero_rows, (layer.mlp.down_proj.weight == 0).all(0))
