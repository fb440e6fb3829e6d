"""The batches learned rotations train on: calibration batches cycled, optionally regrouped
into a fixed number of sequences per step.

SpinQuant (Liu et al. 2024, arXiv:2405.16406) trains each Cayley SGD step on 8 sequences (one
per GPU, 100 steps over 800 WikiText-2 samples); oneshot's calibration batches hold as many
rows as its ``batch_size``, so the rows are regrouped here rather than by the pipeline, whose
own passes keep their batch size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["on_device", "step_batches"]


def _cycle(batches: Iterable[Any]) -> Iterator[Any]:
    while True:
        seen = False
        for batch in batches:
            seen = True
            yield batch
        if not seen:
            raise ValueError("learned rotations need calibration batches, but none were given")


def _checked(batch: Any) -> Mapping[str, Any]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            f"learned rotations need batches with input_ids (a dict of tensors); got "
            f"{type(batch).__name__}"
        )
    return batch


def on_device(batch: Any, device: torch.device) -> dict[str, Any]:
    batch = _checked(batch)
    return {
        key: batch[key].to(device)
        for key in ("input_ids", "attention_mask")
        if batch.get(key) is not None
    }


def _rows(batches: Iterable[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every row of the cycled batches: its token ids and its attention mask (or None)."""
    for batch in _cycle(batches):
        batch = _checked(batch)
        ids, mask = torch.as_tensor(batch["input_ids"]), batch.get("attention_mask")
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        if mask is not None:
            mask = torch.as_tensor(mask).reshape(ids.shape)
        for i in range(ids.shape[0]):
            yield ids[i], None if mask is None else mask[i]


def _stack_rows(rows: list[tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """One batch of ``rows``: right-padded to the longest (padding masked out, so it takes no
    part in the loss and shifts no real token's position); no mask where none is needed."""
    longest = max(ids.shape[0] for ids, _ in rows)
    if all(mask is None and ids.shape[0] == longest for ids, mask in rows):
        return {"input_ids": torch.stack([ids for ids, _ in rows])}
    ids_out = torch.zeros(len(rows), longest, dtype=rows[0][0].dtype)
    mask_out = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        ids_out[i, : ids.shape[0]] = ids
        mask_out[i, : ids.shape[0]] = 1 if mask is None else mask
    return {"input_ids": ids_out, "attention_mask": mask_out}


def step_batches(batches: Iterable[Any], rows: int | None = None) -> Iterator[Any]:
    """The batch of each training step, cycling through ``batches``: each batch as it comes
    (``rows`` None), or their rows regrouped ``rows`` at a time, so that a step's gradient
    averages over as many sequences as asked whatever the calibration batch size (SpinQuant
    trains on 8 sequences a step: one per GPU).

    :param batches: dicts with ``input_ids`` (and ``attention_mask``)
    :param rows: sequences per step; None: the batches unchanged
    """
    if rows is None:
        yield from _cycle(batches)
        return
    source = _rows(batches)
    while True:
        yield _stack_rows([next(source) for _ in range(rows)])
