"""Layer reduction with distillation from the original model as teacher, under the Hugging
Face Trainer: the recipe removes decoder layers when training begins (``strategy: index``,
``start: 0``), then the shallower student is trained towards the outputs (and, layer by
layer, the hidden states) of a copy of the original model; the saved model has fewer layers
and reloads with ``from_pretrained``.

Distils stories260K (../shared) on TinyStories windows.
Usage: python examples/trainer_layer_reduction_distillation.py [--steps N]
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
from transformers import LlamaForCausalLM, TrainerCallback

from compressor import CompressionCallback, CompressionTrainer
from compressor.modifiers import LayerReductionModifier, OutputDistillationModifier
from compressor.modifiers.distillation.losses import distillation_loss
from compressor.utils.eval import perplexity, token_windows


@torch.no_grad()
def student_teacher_kl(student: Any, teacher: Any, ids: torch.Tensor, window: int) -> float:
    """Mean KL(teacher || student) per token (temperature 1) over windows of ``ids``."""
    was_training = student.training
    student.eval()
    teacher.eval()
    try:
        batch = torch.stack(token_windows(ids, window, None))
        return distillation_loss(student(input_ids=batch).logits, teacher(input_ids=batch).logits,
                                 temperature=1.0).item()  # fmt: skip
    finally:
        student.train(was_training)


class _Measure(TrainerCallback):
    """Records the student as it starts training (after the recipe removed its layers)."""

    def __init__(self, teacher: Any, held_out: torch.Tensor, window: int) -> None:
        self.teacher, self.held_out, self.window = teacher, held_out, window
        self.before: dict[str, Any] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        self.before = describe(model, self.teacher, self.held_out, self.window)


def describe(model: Any, teacher: Any, held_out: torch.Tensor, window: int) -> dict[str, Any]:
    return {
        "layers": model.config.num_hidden_layers,
        "params": sum(p.numel() for p in model.parameters()),
        "perplexity": perplexity(model, held_out, window=window, progress=False),
        "kl": student_teacher_kl(model, teacher, held_out, window),
    }


def run(
    model: Any,
    ids: torch.Tensor,
    output_dir: Path,
    steps: int,
    window: int,
    keep: list[int] | None = None,
) -> dict:
    """Keep the layers at ``keep`` (default: every other one, from the first) and distil the
    student from a copy of ``model`` for ``steps`` optimizer steps."""
    train_rows, held_out = split_windows(ids, window, n_train=steps * 8, n_eval=4)
    teacher = copy.deepcopy(model).eval()
    keep = keep if keep is not None else list(range(0, model.config.num_hidden_layers, 2))
    teacher_figures = {
        "layers": teacher.config.num_hidden_layers,
        "params": sum(p.numel() for p in teacher.parameters()),
        "perplexity": perplexity(teacher, held_out, window=window, progress=False),
    }
    recipe = [
        LayerReductionModifier(teacher_layer=keep, start=0),
        OutputDistillationModifier(
            start=0, temperature=2.0, hardness=1.0, hidden_weight=0.1, teacher_layer=keep
        ),  # fmt: skip
    ]
    measure = _Measure(teacher, held_out, window)
    callback = CompressionCallback(recipe, teacher_model=teacher)
    trainer = CompressionTrainer(model=model, args=training_args(output_dir / "run", steps),
                                 train_dataset=train_rows, callbacks=[callback, measure])  # fmt: skip
    trainer.train()
    trainer.save_model(str(output_dir / "reduced"))
    reloaded = LlamaForCausalLM.from_pretrained(output_dir / "reduced")
    return {
        "teacher": teacher_figures,
        "before": measure.before,
        "after": describe(reloaded, teacher, held_out, window),
        "model": model,
        "reloaded": reloaded,
    }


def main() -> None:
    out = run_from_command_line(run, __doc__)
    t = out["teacher"]
    print(f"teacher: {t['layers']} layers, {t['params']:,} parameters, "
          f"held-out perplexity {t['perplexity']:.2f}")  # fmt: skip
    for when, label in (("before", "student before training"), ("after", "student distilled")):
        o = out[when]
        print(f"{label}: {o['layers']} layers, {o['params']:,} parameters, "
              f"held-out perplexity {o['perplexity']:.2f}, KL to teacher {o['kl']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
