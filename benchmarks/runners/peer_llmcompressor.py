"""llm-compressor's side of a case, run with the python of ``.venv-peers/llmcompressor``.

Same model directory, same calibration rows (pre-tokenized, so both sides see identical
tokens), the recipe in llm-compressor's own YAML, the same perplexity function.
"""

from __future__ import annotations

import tempfile
from typing import Any

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
from benchmarks.runners.timing import count_params


def oneshot_task(spec: dict[str, Any], phases: Phases) -> dict[str, Any]:
    with phases("import"):  # as on our side
        from llmcompressor import oneshot
    offload = tempfile.TemporaryDirectory() if spec["params"].get("layers_on_disk") else None
    with phases("load"):
        model, tokenizer = load_model(
            spec["model_path"],
            offload.name if offload else None,
            dtype=spec["params"].get("dtype", "float32"),
        )
        calib = spec.get("calibration")
        rows = calibration_ids(tokenizer, calib) if calib else None
        # the calibration set is input, built before the timing (as on our side)
        dataset = calibration_dataset(rows) if rows else None
    kwargs: dict[str, Any] = {"model": model, "recipe": spec["recipe"], "processor": tokenizer}
    if rows:
        kwargs.update(
            dataset=dataset,
            num_calibration_samples=len(rows),
            max_seq_length=len(rows[0]),
            # in the given order, as ours: its default draws them in an unseeded random order,
            # which changes GPTQ's rounding (and perplexity) from run to run
            shuffle_calibration_samples=False,
        )
    with phases("compress"):
        result = oneshot(**kwargs)
    model = result if isinstance(result, type(model)) else model
    metrics: dict[str, Any] = {"params": count_params(model)}
    metrics.update(moe_metrics(model, spec["model_path"]))
    if spec.get("output_dir"):
        with phases("save"):
            model.save_pretrained(spec["output_dir"], save_compressed=True)
        metrics["checkpoint_mb"] = dir_size_mb(spec["output_dir"])
        if spec["params"].get("two_of_four"):
            metrics["groups_2of4_reloaded"] = two_of_four_after_reload(spec["output_dir"])
    with phases("eval"):
        metrics["ppl"] = evaluate(model, tokenizer, spec.get("eval"))
    return metrics


TASKS = {"oneshot": oneshot_task}
