"""Shared fixtures: tiny models built from configs, the real model in ../shared, and a guard
that fails any test which leaves files in the working directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES_MODEL = SHARED / "models" / "stories260K"
TINYSTORIES_TEXT = SHARED / "data" / "tinystories_val.txt"


@pytest.fixture(autouse=True)
def _no_files_left_behind():
    """Fail the test if it leaves new files in the current working directory."""
    cwd = Path.cwd()
    before = set(os.listdir(cwd))
    yield
    left = sorted(set(os.listdir(cwd)) - before - {".pytest_cache", "__pycache__"})
    if left:
        pytest.fail(f"test left files in the working directory {cwd}: {left}")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_opt(num_hidden_layers=3):
    """A randomly initialised OPT (its layers are not Llama-style)."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=128,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    return OPTForCausalLM(config)


def tiny_bert(**overrides):
    """A randomly initialised two-layer BERT classifier (seed 0), in evaluation mode."""
    from transformers import BertConfig, BertForSequenceClassification

    values = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    values.update(overrides)
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**values)).eval()


@pytest.fixture
def tiny_llama():
    """A randomly initialised two-layer Llama, small enough for every test."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def token_batches():
    """A few batches of random token ids for the tiny Llama (vocabulary 128)."""
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 128, (2, 16), generator=generator)} for _ in range(4)]


@pytest.fixture(scope="session")
def stories_model_path():
    if not (STORIES_MODEL / "config.json").is_file():
        pytest.skip(f"the real model is not present at {STORIES_MODEL} (../shared is absent)")
    return STORIES_MODEL


@pytest.fixture(scope="session")
def tinystories_text():
    if not TINYSTORIES_TEXT.is_file():
        pytest.skip(f"the TinyStories text is not present at {TINYSTORIES_TEXT}")
    return TINYSTORIES_TEXT.read_text(encoding="utf-8")
