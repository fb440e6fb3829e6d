"""Our side of each case: calls only compressor's public API.

An API that has not landed on this branch yet raises NotAvailable naming it and its issue, so
the table says so instead of showing a figure that was never measured.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.api import require
from benchmarks.common import (
    Phases,
    calibration_dataset,
    calibration_ids,
    dir_size_mb,
    evaluate,
    load_model,
    moe_metrics,
    two_of_four_after_reload,
)
from benchmarks.runners.timing import Trainee, alternate_timings, count_params, train_step_case


def _require_all(spec: dict[str, Any]) -> None:
    for dotted in spec.get("requires", []):
        require(dotted)


def eval_task(spec: dict[str, Any], phases: Phases) -> dict[str, Any]:
    """The uncompressed model's perplexity: the 'before' of every accuracy figure."""
    with phases("load"):
        model, tokenizer = load_model(
            spec["model_path"], dtype=spec["params"].get("dtype", "float32")
        )
    with phases("eval"):
        ppl = evaluate(model, tokenizer, spec.get("eval"))
    return {"ppl": ppl, "params": count_params(model)}


def oneshot_task(spec: dict[str, Any], phases: Phases) -> dict[str, Any]:
    """``compressor.oneshot`` with the case's recipe and calibration rows, then save and score."""
    with phases("import"):  # part of what a user waits for: timed like the rest
        _require_all(spec)
        oneshot = require("compressor.oneshot")
    offload = tempfile.TemporaryDirectory() if spec["params"].get("layers_on_disk") else None
    with phases("load"):
        model, tokenizer = load_model(
            spec["model_path"],
            offload.name if offload else None,
            dtype=spec["params"].get("dtype", "float32"),
        )
        calib = spec.get("calibration")
        rows = calibration_ids(tokenizer, calib) if calib else None
        # the calibration set is input, built (and `datasets` imported) before the timing
        dataset = calibration_dataset(rows) if rows else None
    kwargs: dict[str, Any] = {"tokenizer": tokenizer}
    if rows:
        kwargs.update(num_calibration_samples=len(rows), max_seq_length=len(rows[0]))
    with phases("compress"):
        model = oneshot(model, Path(spec["recipe"]), dataset, **kwargs)
    metrics: dict[str, Any] = {"params": count_params(model)}
    metrics.update(moe_metrics(model, spec["model_path"]))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        metrics["layers"] = int(config.num_hidden_layers)
    if spec.get("output_dir"):
        save_compressed = require("compressor.save_compressed")
        with phases("save"):
            # left compressed when nothing reads the model after the save (no evaluation), as
            # llm-compressor leaves its model: decompressing a model with its layers on disk
            # again would be timed as part of the save and raise its peak
            save_compressed(model, spec["output_dir"], decompress=bool(spec.get("eval")))
        metrics["checkpoint_mb"] = dir_size_mb(spec["output_dir"])
        if spec["params"].get("two_of_four"):
            metrics["groups_2of4_reloaded"] = two_of_four_after_reload(spec["output_dir"])
    with phases("eval"):
        metrics["ppl"] = evaluate(model, tokenizer, spec.get("eval"))
    return metrics


def latency_task(spec: dict[str, Any], phases: Phases) -> dict[str, Any]:
    """Forward latency of the compressed (cleaned) model against the dense one, timed in turns
    in this one process; plus the parameter counts."""
    _require_all(spec)
    oneshot = require("compressor.oneshot")
    with phases("load"):
        dense, tokenizer = load_model(spec["model_path"])
        calib = spec.get("calibration")
        rows = calibration_ids(tokenizer, calib) if calib else None
        dataset = calibration_dataset(rows) if rows else None
    with phases("compress"):
        kwargs: dict[str, Any] = {"tokenizer": tokenizer}
        if rows:
            kwargs.update(num_calibration_samples=len(rows), max_seq_length=len(rows[0]))
        compressed = oneshot(copy.deepcopy(dense), Path(spec["recipe"]), dataset, **kwargs)
    params = spec.get("params", {})
    with phases("latency"):
        timings = alternate_timings(
            {"dense": dense, "compressed": compressed},
            batch=int(params.get("batch", 1)),
            seq_len=int(params.get("seq_len", 128)),
            iters=int(params.get("iters", 10)),
            vocab=int(dense.config.vocab_size),
        )
    metrics = {
        "dense_ms": timings["dense"] * 1000,
        "compressed_ms": timings["compressed"] * 1000,
        "speedup": timings["dense"] / timings["compressed"],
        "params_dense": count_params(dense),
        "params": count_params(compressed),
    }
    if spec.get("eval"):
        with phases("eval"):
            metrics["ppl"] = evaluate(compressed, tokenizer, spec["eval"])
    return metrics


class SessionTrainee(Trainee):
    """A training step under a CompressionSession: batch start, loss, optimizer step (whose
    events the session's optimizer hooks fire), batch end; finalize at the end."""

    def __init__(self, model: Any, recipe_path: str) -> None:
        from compressor import CompressionSession, Recipe

        super().__init__(model)
        self.session = CompressionSession()
        self.session.initialize(
            model, Recipe.from_file(Path(recipe_path)), optimizer=self.optimizer
        )

    def step(self, batch: dict[str, Any]) -> float:
        self.session.batch_start(batch_data=batch)
        loss = self.session.loss_calculated(self.model(**batch).loss)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.session.batch_end()
        return float(loss.detach())

    def finish(self) -> None:
        self.session.finalize()


def train_task(spec: dict[str, Any], phases: Phases) -> dict[str, Any]:
    """Median training step time with the recipe's modifiers active (a CompressionSession in a
    plain loop) against a plain step of an identical model, the two alternating step by step."""
    _require_all(spec)
    with phases("load"):
        model, tokenizer = load_model(spec["model_path"])
        rows = calibration_ids(tokenizer, spec["calibration"])
    with phases("train"):
        return train_step_case(
            model, rows, spec.get("params", {}), lambda m: SessionTrainee(m, spec["recipe"])
        )


TASKS = {
    "eval": eval_task,
    "oneshot": oneshot_task,
    "latency": latency_task,
    "train": train_task,
}
