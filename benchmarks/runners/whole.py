"""The whole process, as a user runs it, for each side: ``whole`` (import, load, compress,
save to disk, nothing after) and ``import`` (the library's import alone); and ``floor``: torch
and transformers imported and the same model, tokenizer and rows loaded, with no compression
library, what any tool built on transformers pays before it compresses anything.

The case process is timed by the harness from before the interpreter starts to its exit, so
this module (and what the case process imports before a task starts: ``benchmarks.child``,
``benchmarks.common``) imports only the standard library at its top; torch, transformers and
the library are imported inside the ``import`` phase. No evaluation and no figure that reads
the model follows the save, so the process's wall time, CPU time and peak are the job's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from benchmarks.api import require
from benchmarks.common import (
    Phases,
    calibration_dataset,
    calibration_ids,
    dir_size_mb,
    load_model,
    set_threads,
)


def _load(spec: dict[str, Any], phases: Phases) -> tuple[Any, Any, list[list[int]] | None, Any]:
    """The model, its tokenizer and the calibration rows, the same on both sides (the rows
    as a ``datasets.Dataset``, the one input both libraries take)."""
    with phases("load"):
        model, tokenizer = load_model(spec["model_path"])
        calib = spec.get("calibration")
        rows = calibration_ids(tokenizer, calib) if calib else None
        dataset = calibration_dataset(rows) if rows else None
    return model, tokenizer, rows, dataset


def ours_whole(spec: dict[str, Any], phases: Phases) -> dict[str, Any]:
    with phases("import"):
        oneshot = require("compressor.oneshot")
        save_compressed = require("compressor.save_compressed")
        for dotted in spec.get("requires", []):
            require(dotted)
        set_threads(spec.get("threads"))  # torch is loaded by now
    model, tokenizer, rows, dataset = _load(spec, phases)
    kwargs: dict[str, Any] = {"tokenizer": tokenizer}
    if rows:
        kwargs.update(num_calibration_samples=len(rows), max_seq_length=len(rows[0]))
    with phases("compress"):
        model = oneshot(model, Path(spec["recipe"]), dataset, **kwargs)
    with phases("save"):
        # nothing reads the model after the save (llm-compressor too leaves it compressed)
        save_compressed(model, spec["output_dir"], decompress=False)
    return {"checkpoint_mb": dir_size_mb(spec["output_dir"])}


def peer_whole(spec: dict[str, Any], phases: Phases) -> dict[str, Any]:
    with phases("import"):
        from llmcompressor import oneshot

        set_threads(spec.get("threads"))
    model, tokenizer, rows, dataset = _load(spec, phases)
    kwargs: dict[str, Any] = {"model": model, "recipe": spec["recipe"], "processor": tokenizer}
    if rows:
        kwargs.update(
            dataset=dataset,
            num_calibration_samples=len(rows),
            max_seq_length=len(rows[0]),
            shuffle_calibration_samples=False,  # in the given order, as ours
        )
    with phases("compress"):
        result = oneshot(**kwargs)
    model = result if isinstance(result, type(model)) else model
    with phases("save"):  # llm-compressor's save_pretrained wrapper, as its users save
        model.save_pretrained(spec["output_dir"], save_compressed=True)
    return {"checkpoint_mb": dir_size_mb(spec["output_dir"])}


def ours_import(spec: dict[str, Any], phases: Phases) -> dict[str, Any]:
    with phases("import"):
        import compressor  # noqa: F401
    return {"modules_imported": len(sys.modules)}


def peer_import(spec: dict[str, Any], phases: Phases) -> dict[str, Any]:
    with phases("import"):
        import llmcompressor  # noqa: F401
    return {"modules_imported": len(sys.modules)}


def floor(spec: dict[str, Any], phases: Phases) -> dict[str, Any]:
    """No library: what ``whole`` costs on either side before its compression starts."""
    with phases("import"):
        import torch  # noqa: F401
        import transformers.modeling_utils  # noqa: F401  (every from_pretrained imports it)

        set_threads(spec.get("threads"))
    _load(spec, phases)
    return {"modules_imported": len(sys.modules)}


TASKS = {
    "ours": {"whole": ours_whole, "import": ours_import, "floor": floor},
    "llmcompressor": {"whole": peer_whole, "import": peer_import},
}
