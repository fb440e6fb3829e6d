"""DeepSpeed ``sparse_pruning`` with ``method: snip_momentum``: converted key by key, trained
with the Trainer, and the result pruned as DeepSpeed's rule prunes (the rule itself is
checked step by step against a reference in ``tests/modifiers/pruning/test_snip_momentum.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from compressor import CompressionSession
from compressor.entrypoints.trainer import CompressionCallback
from compressor.recipe import Recipe, RecipeError

CONFIG = Path(__file__).parent / "data" / "ds_bert_snip_momentum.json"


def _snip(**shared) -> dict:
    values = {"enabled": True, "method": "snip_momentum", **shared}
    return {"sparse_pruning": {"shared_parameters": values, "different_groups": {}}}


def _bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def test_every_key_maps_onto_the_modifier():
    (modifier,) = Recipe.from_deepspeed(CONFIG).modifiers
    assert type(modifier).__name__ == "SparsePruningModifier"
    assert modifier.method == "snip_momentum"
    assert modifier.density == 0.3  # dense_ratio
    assert modifier.block_pattern == "4x1"
    assert (modifier.start, modifier.end, modifier.update) == (1, 5, 2)
    assert modifier.ignore == ["re:.*(?:classifier)", "re:.*(?:pooler)"]  # excluded_modules
    assert modifier.targets is None  # DeepSpeed's choice of layers
    recipe = Recipe.from_deepspeed(CONFIG)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe


def test_deepspeed_defaults_fill_the_keys_not_given():
    (modifier,) = Recipe.from_deepspeed(_snip()).modifiers
    assert modifier.density == 0.1
    assert modifier.block_pattern == "4x1"
    assert (modifier.start, modifier.end, modifier.update) == (1000, 1000, 1)
    assert modifier.ignore == []


def _dataset():
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        ids = torch.randint(0, 64, (16,), generator=gen)
        rows.append(
            {"input_ids": ids, "attention_mask": torch.ones(16, dtype=torch.long), "labels": i % 2}
        )
    return rows


def test_a_deepspeed_config_trains_to_deepspeeds_block_sparsity(tmp_path):
    model = _bert()
    layers = {
        n: m.weight
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "pooler" not in n and n != "classifier"
    }
    callback = CompressionCallback(Recipe.from_deepspeed(CONFIG))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        num_train_epochs=2,  # 8 optimizer steps: pruning steps 1, 3 and 5
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[callback]).train()
    pruned_blocks = total_blocks = 0
    for name, weight in layers.items():
        blocks = (weight == 0).reshape(weight.shape[0] // 4, 4, -1)
        # 4x1: four consecutive outputs of one input are pruned together, or none of them
        assert torch.equal(blocks.all(dim=1), blocks.any(dim=1)), name
        pruned_blocks += int(blocks.all(dim=1).sum())
        total_blocks += blocks.shape[0] * blocks.shape[2]
    # DeepSpeed's last pruning step leaves int(blocks * (1 - dense_ratio)) blocks pruned
    assert pruned_blocks == int(total_blocks * 0.7)
    assert (model.classifier.weight != 0).all() and (model.bert.pooler.dense.weight != 0).all()
    assert (model.bert.embeddings.word_embeddings.weight[1:] != 0).all()  # row 0: padding


def test_a_pattern_that_does_not_tile_a_layer_fails_at_initialize_naming_it():
    recipe = Recipe.from_deepspeed(
        _snip(block_pattern="3x1", schedule_offset=0, schedule_offset_end=2)
    )
    with pytest.raises(
        ValueError, match="block_pattern 3x1: bert.encoder.layer.0.attention.self.query"
    ):
        CompressionSession().initialize(model=_bert(), recipe=recipe)


@pytest.mark.parametrize(
    ("shared", "groups", "message"),
    [
        (
            {"block_pattern": "2:4"},
            {},
            r"(?s)sparse_pruning.*block_pattern must be 'NxM'.*got '2:4'",
        ),
        (
            {"block_pattern": "four"},
            {},
            r"(?s)sparse_pruning.*block_pattern must be.*'channelxM' or 'Nxchannel'; got 'four'",
        ),
        ({"schedule_offset": 0}, {}, "schedule_offset_end: 0"),
        (
            {},
            {"sp1": {"params": {"dense_ratio": 0.5}, "modules": ["query"]}},
            r"different_groups \(sp1\).*leave different_groups empty",
        ),
        ({"dense_ratio": 1.0}, {}, "dense_ratio"),
    ],
)
def test_configs_deepspeed_cannot_run_are_refused_naming_the_key(shared, groups, message):
    config = _snip(**shared)
    config["sparse_pruning"]["different_groups"] = groups
    with pytest.raises(RecipeError, match=message):
        Recipe.from_deepspeed(config)
