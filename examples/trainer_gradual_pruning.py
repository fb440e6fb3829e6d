"""Gradual magnitude pruning under the Hugging Face Trainer: density ramps from 100% to 50%
between two offsets (Zhu & Gupta, 2017, "To prune, or not to prune"), then the masks hold
while training goes on.

Fine-tunes stories260K (../shared) on TinyStories windows and reports the held-out
perplexity of the dense and of the 50%-sparse model.
Usage: python examples/trainer_gradual_pruning.py [--steps N]
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
from transformers import Trainer

from compressor import CompressionCallback
from compressor.modifiers.pruning import SparsePruningModifier
from compressor.utils.eval import perplexity


def density_of(model: torch.nn.Module) -> dict[str, float]:
    """The fraction of non-zero weights of every decoder Linear layer."""
    return {
        name: float((module.weight != 0).float().mean())
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"
    }


def run(model: Any, ids: torch.Tensor, output_dir: Path, steps: int, window: int) -> dict:
    """Prune between 1/4 and 3/4 of ``steps``; returns perplexities and layer densities."""
    train_rows, held_out = split_windows(ids, window, n_train=steps * 8, n_eval=4)
    ppl_dense = perplexity(model, held_out, window=window, progress=False)
    start, end = steps // 4, (3 * steps) // 4
    gmp = SparsePruningModifier(density=0.5, init_density=1.0, start=start, end=end, update=1)
    callback = CompressionCallback([gmp])
    trainer = Trainer(model=model, args=training_args(output_dir / "run", steps),
                      train_dataset=train_rows, callbacks=[callback])  # fmt: skip
    trainer.train()
    trainer.save_model(str(output_dir / "pruned"))
    return {
        "dense": ppl_dense,
        "pruned": perplexity(model, held_out, window=window, progress=False),
        "densities": density_of(model),
        "saved": output_dir / "pruned",
        "start": start,
        "end": end,
    }


def main() -> None:
    out = run_from_command_line(run, __doc__)
    mean = sum(out["densities"].values()) / len(out["densities"])
    print(f"pruned from step {out['start']} to {out['end']}: mean layer density {mean:.3f}; "
          f"held-out perplexity dense {out['dense']:.2f}, 50% sparse {out['pruned']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
