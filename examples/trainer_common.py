"""What the Trainer examples share: the stories260K model and TinyStories text from ../shared
(or a tiny random Llama and random tokens when they are absent), token windows as a dataset,
and small TrainingArguments."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    TrainingArguments,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES_MODEL = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "data" / "tinystories_val.txt"


def load_model_and_tokens(window: int) -> tuple[LlamaForCausalLM, torch.Tensor]:
    """stories260K and the TinyStories token ids, else a tiny Llama and random ids."""
    if (STORIES_MODEL / "config.json").is_file() and TINYSTORIES.is_file():
        model = LlamaForCausalLM.from_pretrained(STORIES_MODEL)
        tokenizer = AutoTokenizer.from_pretrained(STORIES_MODEL)
        text = "\n".join(p for p in TINYSTORIES.read_text(encoding="utf-8").split("\n") if p)
        ids = torch.tensor(tokenizer(text)["input_ids"])
        return model, ids
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max(64, window))  # fmt: skip
    return LlamaForCausalLM(config), torch.randint(0, 128, (window * 64,))


def split_windows(
    ids: torch.Tensor, window: int, n_train: int, n_eval: int
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Training rows (the first ``n_train`` windows) and held-out ids (the last ``n_eval``)."""
    total = ids.numel() // window
    if total < n_train + n_eval:
        raise ValueError(f"{total} windows of {window} tokens, need {n_train + n_eval}")
    rows = [ids[i * window : (i + 1) * window] for i in range(n_train)]
    held_out = ids[(total - n_eval) * window : total * window]
    return [{"input_ids": r, "labels": r.clone()} for r in rows], held_out


def training_args(output_dir: str | Path, max_steps: int, **overrides: Any) -> TrainingArguments:
    values: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def run_from_command_line(run: Callable[..., dict], description: str, **options: Any) -> dict:
    """Parse ``--steps``, ``--window``, ``--output-dir`` and ``options`` (name=default), load
    the model and text, and call ``run(model, ids, output_dir, steps, window, *options)``; the
    output goes to a temporary directory unless ``--output-dir`` is given."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--window", type=int, default=128)
    for name, default in options.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--output-dir", type=Path, default=None)
    args = parser.parse_args()
    model, ids = load_model_and_tokens(args.window)
    extra = [getattr(args, name) for name in options]
    with tempfile.TemporaryDirectory() as tmp:
        return run(model, ids, args.output_dir or Path(tmp), args.steps, args.window, *extra)
