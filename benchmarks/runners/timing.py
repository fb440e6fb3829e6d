"""Timing inside one case process, for figures that compare two models of the same run: two
models timed in turns (alternating which goes first), medians over iterations."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def alternate_timings(
    models: dict[str, torch.nn.Module], batch: int, seq_len: int, iters: int, vocab: int
) -> dict[str, float]:
    """Median seconds of one forward pass per model, the models taking turns (the order flips
    every iteration), after one warm-up pass each."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    names = list(models)
    for name in names:
        models[name].eval()
        models[name](input_ids=ids)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            models[name](input_ids=ids)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class Trainee:
    """A model with its optimizer, taking one plain training step at a time."""

    lr = 1e-4  # the same AdamW for every side

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.optimizer = self.make_optimizer()

    def make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch).loss

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def train_step_case(
    model: torch.nn.Module,
    rows: list[list[int]],
    params: dict[str, Any],
    attach: Callable[[torch.nn.Module], Trainee],
) -> dict[str, Any]:
    """Median step time of ``attach(copy of model)`` against a plain Trainee of the same model.

    The two take steps in turns on the same batches (the order flips each step); the first
    ``warmup`` steps are not timed.
    """
    import copy

    batch_size = int(params.get("batch", 4))
    steps, warmup = int(params.get("steps", 10)), int(params.get("warmup", 2))
    torch.manual_seed(0)
    plain = Trainee(copy.deepcopy(model))
    compressed = attach(model)
    plain.model.train()
    compressed.model.train()
    sides = {"plain": plain, "compressed": compressed}
    times: dict[str, list[float]] = {"plain": [], "compressed": []}
    losses: dict[str, float] = {}
    for i in range(warmup + steps):
        start = (i * batch_size) % max(1, len(rows) - batch_size + 1)
        ids = torch.tensor(rows[start : start + batch_size])
        batch = {"input_ids": ids, "labels": ids}
        for name in sides if i % 2 == 0 else reversed(list(sides)):
            t0 = time.perf_counter()
            losses[name] = sides[name].step(batch)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    finish = getattr(compressed, "finish", None)
    if finish is not None:
        finish()
    plain_s, comp_s = statistics.median(times["plain"]), statistics.median(times["compressed"])
    return {
        "plain_step_ms": plain_s * 1000,
        "step_ms": comp_s * 1000,
        "step_ratio": comp_s / plain_s,
        "steps": steps,
        "loss_plain": losses["plain"],
        "loss": losses["compressed"],
    }
