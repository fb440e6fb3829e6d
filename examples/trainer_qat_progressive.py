"""Quantization-aware training with progressive bits (8 -> 4 over the period) under the
Hugging Face Trainer, against post-training W4 quantization of the same model.

Fine-tunes stories260K (../shared) on TinyStories windows while its Linear weights are
fake-quantized, dropping one bit each time the step count reaches a doubling threshold
(DeepSpeed's MoQ schedule) from 8 to 4 bits; then compares the held-out perplexity with
round-to-nearest W4 of the original model and saves the QAT model in compressed-tensors
format. Usage: python examples/trainer_qat_progressive.py [--steps N]
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from trainer_common import (
    run_from_command_line,
    split_windows,
    training_args,
)
from transformers import Trainer

from compressor import CompressionCallback, CompressionSession
from compressor.checkpoint.compressed import save_compressed
from compressor.modifiers.quantization import QuantizationModifier
from compressor.utils.eval import perplexity

# 4-bit symmetric weights, one scale per output channel (any hidden size divides)
W4 = {"w4": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "channel"}}}


def post_training_w4(model: torch.nn.Module) -> torch.nn.Module:
    """Round-to-nearest W4 of ``model`` (weights only: no calibration data needed)."""
    session = CompressionSession()
    session.initialize(model, [QuantizationModifier(config_groups=W4, ignore=["lm_head"])])
    session.finalize()
    return model


def run(
    model: Any, ids: torch.Tensor, output_dir: Path, steps: int, window: int, lr: float = 1e-4
) -> dict:
    """QAT for ``steps`` optimizer steps at learning rate ``lr`` (small: the model is already
    trained); returns perplexities and the saved folder."""
    train_rows, held_out = split_windows(ids, window, n_train=steps * 8, n_eval=4)
    ppl_base = perplexity(model, held_out, window=window, progress=False)
    ppl_ptq = perplexity(post_training_w4(copy.deepcopy(model)), held_out, window, progress=False)
    period = max(steps // 16, 1)  # drops at steps period * (1, 2, 4, 8) - 1: 4 bits by half-way
    qat = QuantizationModifier(config_groups=W4, ignore=["lm_head"], start=0, start_bits=8,
                               target_bits=4, quantization_period=period)  # fmt: skip
    callback = CompressionCallback([qat])
    trainer = Trainer(model=model, args=training_args(output_dir / "run", steps, learning_rate=lr),
                      train_dataset=train_rows, callbacks=[callback])  # fmt: skip
    trainer.train()
    ppl_qat = perplexity(model, held_out, window=window, progress=False)
    saved = save_compressed(model, output_dir / "qat-w4", recipe=[qat])
    return {"base": ppl_base, "ptq_w4": ppl_ptq, "qat_w4": ppl_qat, "saved": saved}


def main() -> None:
    out = run_from_command_line(run, __doc__, lr=1e-4)
    print(f"held-out perplexity: original {out['base']:.2f}, post-training W4 "
          f"{out['ptq_w4']:.2f}, QAT 8->4 bits {out['qat_w4']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
