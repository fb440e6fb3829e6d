"""Head and row pruning with learnable TopK scores under the Hugging Face Trainer: attention
heads (key-value groups) and MLP rows are scored by trainable scores (initialised from their
magnitudes) while fine-tuning, the kept sets are frozen at the end offset, and at the end of
training the pruned heads and rows are removed, so the saved model is smaller and reloads
with ``from_pretrained``.

Fine-tunes stories260K (../shared) on TinyStories windows.
Usage: python examples/trainer_topk_structured.py [--steps N]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from trainer_common import (
    run_from_command_line,
    split_windows,
    training_args,
)
from transformers import LlamaForCausalLM, Trainer

from compressor import CompressionCallback
from compressor.modifiers.pruning import HeadPruningModifier, RowPruningModifier
from compressor.utils.eval import perplexity


def run(model: Any, ids: torch.Tensor, output_dir: Path, steps: int, window: int) -> dict:
    """Keep half of the heads and of the MLP rows, chosen by scores learnt in the first half
    of ``steps``."""
    train_rows, held_out = split_windows(ids, window, n_train=steps * 8, n_eval=4)
    before = {
        "params": sum(p.numel() for p in model.parameters()),
        "intermediate_size": model.config.intermediate_size,
        "num_key_value_heads": model.config.num_key_value_heads,
        "perplexity": perplexity(model, held_out, window=window, progress=False),
    }
    schedule = dict(method="topk", density=0.5, start=0, end=steps // 2)
    heads = HeadPruningModifier(**schedule)
    rows = RowPruningModifier(**schedule)
    callback = CompressionCallback([heads, rows])
    trainer = Trainer(model=model, args=training_args(output_dir / "run", steps),
                      train_dataset=train_rows, callbacks=[callback])  # fmt: skip
    trainer.train()
    trainer.save_model(str(output_dir / "pruned"))
    reloaded = LlamaForCausalLM.from_pretrained(output_dir / "pruned")
    after = {
        "params": sum(p.numel() for p in reloaded.parameters()),
        "intermediate_size": reloaded.config.intermediate_size,
        "num_key_value_heads": reloaded.config.num_key_value_heads,
        "perplexity": perplexity(reloaded, held_out, window=window, progress=False),
    }
    return {"before": before, "after": after, "model": model, "reloaded": reloaded}


def main() -> None:
    out = run_from_command_line(run, __doc__)
    for when in ("before", "after"):
        o = out[when]
        print(f"{when}: {o['params']:,} parameters, {o['num_key_value_heads']} key-value heads, "
              f"intermediate_size {o['intermediate_size']}, "
              f"held-out perplexity {o['perplexity']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
