"""DeepSpeed compression's side of a training case, run with the python of
``.venv-peers/deepspeed`` (DS_ACCELERATOR=cpu; deepspeed==0.19.6, the last release that has
``deepspeed.compression``).

``init_compression`` swaps the targeted Linears for its compress layers, the optimizer is made
after it (it replaces parameters), and ``compression_scheduler.step()`` runs after every
optimizer step, as its documentation shows.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from benchmarks.common import Phases, calibration_ids, load_model
from benchmarks.runners.timing import Trainee, train_step_case


class DeepSpeedTrainee(Trainee):
    def __init__(self, model: torch.nn.Module, config: dict[str, Any]) -> None:
        from deepspeed.compression.compress import init_compression
        from deepspeed.compression.config import get_compression_config
        from deepspeed.compression.scheduler import compression_scheduler

        model = init_compression(model, config)
        super().__init__(model)  # the optimizer is made after init_compression
        # the scheduler reads the parsed config (as DeepSpeed's engine passes it), where its
        # sparse pruning also needs schedule_offset_end, which the parser does not carry over
        parsed = get_compression_config(config)
        raw_sparse = config["compression_training"].get("sparse_pruning", {})
        end = raw_sparse.get("shared_parameters", {}).get("schedule_offset_end")
        if end is not None:
            parsed["sparse_pruning"]["shared_parameters"].setdefault("schedule_offset_end", end)
        self.scheduler = compression_scheduler(model, parsed)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(loss.detach())


def train_task(spec: dict[str, Any], phases: Phases) -> dict[str, Any]:
    with open(spec["recipe"], encoding="utf-8") as handle:
        config = json.load(handle)
    with phases("load"):
        model, tokenizer = load_model(spec["model_path"])
        rows = calibration_ids(tokenizer, spec["calibration"])
    with phases("train"):
        return train_step_case(
            model, rows, spec.get("params", {}), lambda m: DeepSpeedTrainee(m, config)
        )


TASKS = {"train": train_task}
