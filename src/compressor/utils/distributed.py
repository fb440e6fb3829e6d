"""Agreement across processes: statistics that modifiers compute from data are reduced over
every rank, so that under DDP each rank computes the same masks and quantization parameters.

Every function is a no-op in a single process (``torch.distributed`` not initialized, or a
world of one), so modifiers call them unconditionally.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.distributed as dist

__all__ = [
    "ReduceOp",
    "all_reduce_",
    "all_reduce_mean_",
    "broadcast_",
    "is_distributed",
    "rank",
    "world_size",
]

ReduceOp = Literal["sum", "mean", "max", "min"]
_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}


def is_distributed() -> bool:
    """Whether several processes share the work (an initialized group of more than one)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_(tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
    """Reduce ``tensor`` over every rank, in place, and return it.

    :param tensor: a statistic computed from this rank's data (a sum, a count, an absmax)
    :param op: ``sum``, ``mean`` (the unweighted mean of the ranks' values), ``max`` or ``min``
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if not is_distributed():
        return tensor
    # reduce in float32 where the backend lacks the dtype (gloo has no bfloat16 sum)
    work = tensor if tensor.dtype in (torch.float32, torch.float64, torch.int64) else None
    buffer = tensor.detach().float() if work is None else tensor.data
    dist.all_reduce(buffer, op=getattr(dist.ReduceOp, _OPS[op]))
    if op == "mean":
        buffer /= dist.get_world_size()
    if work is None:
        tensor.data.copy_(buffer.to(tensor.dtype))
    return tensor


def all_reduce_mean_(total: torch.Tensor, count: torch.Tensor | float) -> torch.Tensor:
    """The mean over every rank's data from per-rank sums and counts, written into ``total``.

    Ranks may have seen different amounts of data, so means are reduced as sum and count.

    :param total: this rank's sum of the statistic (changed in place into the global mean)
    :param count: how many items the sum covers on this rank
    """
    counts = torch.as_tensor(count, dtype=torch.float64, device=total.device).clone()
    all_reduce_(total, "sum")
    all_reduce_(counts, "sum")
    if counts.item() <= 0:
        raise ValueError("cannot take a mean over zero items on every rank")
    total.data.div_(counts.to(total.dtype))
    return total


def broadcast_(tensors: torch.Tensor | Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values into every rank's tensors, in place (random initial scores,
    anything drawn from a random generator)."""
    if not is_distributed():
        return
    for tensor in [tensors] if isinstance(tensors, torch.Tensor) else tensors:
        dist.broadcast(tensor.data, src=src)
