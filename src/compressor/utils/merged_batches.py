"""Which calibration batches the forward running now merges, so that a statistic that depends
on the batches (a moving average of per-batch ranges) can see them one by one.

The sequential pipeline may run several consecutive calibration batches through a layer as
one forward (its cached calls stacked along the batch dimension): larger matrix products are
faster on CPU. Statistics summed over tokens do not notice; an observer that averages each
batch's range does. The pipeline says which batch sizes it stacked (``merged_batches``); such
an observer splits what it sees back into those batches (``split_into_batches``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch

__all__ = ["merged_batches", "split_into_batches"]

_SIZES: ContextVar[tuple[int, ...] | None] = ContextVar("merged_batch_sizes", default=None)


@contextmanager
def merged_batches(batch_sizes: Sequence[int]) -> Iterator[None]:
    """Within the block, forwards run the calibration batches of ``batch_sizes`` (rows each,
    in order) stacked along dimension 0; one size: a batch on its own."""
    token = _SIZES.set(tuple(batch_sizes) if len(batch_sizes) > 1 else None)
    try:
        yield
    finally:
        _SIZES.reset(token)


def split_into_batches(value: torch.Tensor, where: str) -> list[torch.Tensor]:
    """``value`` (an activation with the batch first) as the calibration batches it stacks.

    :param where: the module and role, for the error
    :raises RuntimeError: when batches are stacked but ``value``'s first dimension is not
        their rows (tokens gathered across rows, as an expert sees them): the caller must not
        let such batches be merged
    """
    sizes = _SIZES.get()
    if sizes is None:
        return [value]
    if value.dim() < 2 or value.shape[0] != sum(sizes):
        raise RuntimeError(
            f"{where}: the forward stacks calibration batches of {list(sizes)} rows, but this "
            f"activation of shape {tuple(value.shape)} does not keep them apart along its first "
            "dimension, so a per-batch statistic cannot be taken from it"
        )
    return list(value.split(sizes))
