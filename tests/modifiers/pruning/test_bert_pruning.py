import torch

from compressor import CompressionSession
from compressor.modifiers import HeadPruningModifier, RowPruningModifier
from conftest import tiny_bert


def _bert():
    model = tiny_bert(intermediate_size=48, num_labels=3)
    with torch.no_grad():  # BERT starts with zero biases; give them values that would leak
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.bias.normal_(0, 0.1)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _one_shot(model, modifiers):
    session = CompressionSession()
    session.initialize(model=model, recipe=modifiers)
    session.calibration_epoch_start()
    session.calibration_epoch_end()
    return session


def test_bert_rows_shrink_and_reload(tmp_path):
    from transformers import BertForSequenceClassification

    model = _bert()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    session = _one_shot(model, [RowPruningModifier(density=0.5)])
    inter = model.bert.encoder.layer[0].intermediate.dense
    # the bias of a pruned row is zero too, so GELU(0) = 0 and nothing leaks through
    assert int((inter.weight == 0).all(1).sum()) == 24 and int((inter.bias == 0).sum()) == 24
    masked = _logits(model, ids)
    session.finalize()
    assert model.config.intermediate_size == 24 and inter.weight.shape == (24, 32)
    assert model.bert.encoder.layer[1].output.dense.in_features == 24
    torch.testing.assert_close(_logits(model, ids), masked, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    again = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(again, ids), _logits(model, ids))


def test_bert_heads_shrink_in_memory():
    model = _bert()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    session = _one_shot(model, [HeadPruningModifier(density=0.5)])
    masked = _logits(model, ids)
    session.finalize()
    attn = model.bert.encoder.layer[0].attention
    assert attn.self.query.weight.shape == (16, 32) and attn.output.dense.in_features == 16
    assert attn.self.num_attention_heads == 2 and attn.self.all_head_size == 16
    torch.testing.assert_close(_logits(model, ids), masked, rtol=0, atol=1e-5)
