"""Checks on calibration data, run when the batches are built (before calibration): rows long
enough to calibrate on, a warning when the data is much smaller than requested, and token ids
inside the model's vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from loguru import logger

from compressor.calibration.arguments import CalibrationArguments

__all__ = [
    "MIN_TOKENS",
    "check_token_ids",
    "describe",
    "drop_short_rows",
    "warn_if_much_smaller",
]

MIN_TOKENS = 2  # a row under two tokens gives no context: empty text, or a lone BOS token


def drop_short_rows(sequences: list, dataset: Any) -> list:
    """``sequences`` without the rows under ``MIN_TOKENS`` tokens (a warning says how many);
    an error when none remains."""
    kept = [s for s in sequences if s.numel() >= MIN_TOKENS]
    dropped = len(sequences) - len(kept)
    if not kept:
        raise ValueError(
            f"dataset {describe(dataset)} holds no row of {MIN_TOKENS} tokens or more to "
            f"calibrate on ({len(sequences)} row(s), all shorter: empty text?)"
        )
    if dropped:
        logger.warning(
            "dropped {} of {} calibration row(s) with fewer than {} tokens (empty text?)",
            dropped,
            len(sequences),
            MIN_TOKENS,
        )
    return kept


def warn_if_much_smaller(tokens: int, rows: int, args: CalibrationArguments) -> None:
    """Warn when ``tokens`` is under a tenth of what ``args`` requests."""
    requested = args.num_calibration_samples * args.max_seq_length
    if tokens * 10 < requested:
        logger.warning(
            "calibrating on {} token(s) in {} row(s), under a tenth of the {} requested "
            "(num_calibration_samples={} x max_seq_length={}): results may be poor; give more "
            "data or lower the request",
            tokens,
            rows,
            requested,
            args.num_calibration_samples,
            args.max_seq_length,
        )


def check_token_ids(batches: Sequence[dict[str, torch.Tensor]], model: torch.nn.Module) -> None:
    """Refuse token ids outside the model's vocabulary (its input embedding's rows), which
    would fail, or index garbage, only once calibration runs.

    :param batches: calibration batches
    :param model: the model; one without an input embedding is not checked
    :raises ValueError: naming the batch, the id and the vocabulary size
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    size = getattr(embeddings, "num_embeddings", None)
    if not isinstance(size, int):
        return
    for position, batch in enumerate(batches):
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.numel() == 0:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= size:
            bad = low if low < 0 else high
            raise ValueError(
                f"calibration batch {position} holds token id {bad}, outside the model's "
                f"vocabulary of {size} (ids 0..{size - 1}); was the data tokenized with "
                "another model's tokenizer?"
            )


def describe(value: Any) -> str:
    """A short description of a user's value for an error message."""
    return f"{type(value).__name__} {value!r}"[:120]
