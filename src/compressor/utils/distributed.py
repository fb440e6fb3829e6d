"""Agreement across processes: statistics that modifiers compute from data are reduced over
every rank, so that under DDP (or ``oneshot`` under ``torchrun``) each rank computes the same
masks and quantization parameters; work is shared out and its results broadcast.

Every function is a no-op in a single process (``torch.distributed`` not initialized, or a
world of one), so modifiers call them unconditionally. Collectives must be reached by every
rank in the same order: callers iterate over what every rank knows alike (module names in
model order), never over what only this rank's data produced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = [
    "ReduceOp",
    "all_gather_object",
    "all_reduce_",
    "all_reduce_mean_",
    "any_rank",
    "assign_by_cost",
    "barrier",
    "broadcast_",
    "broadcast_parts",
    "check_agreement",
    "is_distributed",
    "rank",
    "reduce_optional",
    "share_of",
    "split_evenly",
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
    # reduce in float32 where the backend lacks the dtype (gloo has no bfloat16 sum), and on
    # the backend's device (NCCL reduces CUDA tensors only)
    device = _backend_device(tensor)
    work = tensor if tensor.dtype in (torch.float32, torch.float64, torch.int64) else None
    if work is not None and device == tensor.device:
        buffer = tensor.data
    else:
        work = None
        dtype = tensor.dtype if tensor.dtype in (torch.float64, torch.int64) else torch.float32
        buffer = tensor.detach().to(device=device, dtype=dtype, copy=True)
    dist.all_reduce(buffer, op=getattr(dist.ReduceOp, _OPS[op]))
    if op == "mean":
        buffer /= dist.get_world_size()
    if work is None:
        tensor.data.copy_(buffer.to(device=tensor.device, dtype=tensor.dtype))
    return tensor


def _backend_device(tensor: torch.Tensor) -> torch.device:
    """Where a collective on ``tensor`` runs: the tensor's device, except a CPU tensor under
    NCCL, which goes to this process's CUDA device."""
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


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


def barrier() -> None:
    """Wait until every rank gets here (nothing in one process)."""
    if is_distributed():
        dist.barrier()


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` in one process."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def check_agreement(what: str, value: str) -> None:
    """Raise on every rank unless every rank passes the same ``value``.

    Only a digest travels, so ``value`` may be long (a recipe's YAML, a model's config).

    :param what: what is compared, for the error (``"the recipe"``)
    :param value: this rank's description of it
    :raises ValueError: naming the ranks and their digests when they differ
    """
    digest = hashlib.sha256(value.encode()).hexdigest()[:16]
    digests = all_gather_object(digest)
    if len(set(digests)) > 1:
        each = ", ".join(f"rank {r}: {d}" for r, d in enumerate(digests))
        raise ValueError(
            f"the ranks disagree on {what} (digests {each}); every rank of the process group "
            "must be given the same, or each would compress differently"
        )


def split_evenly(count: int, parts: int) -> list[range]:
    """``range(count)`` cut into ``parts`` contiguous ranges whose lengths differ by at most
    one, the longer ones first: the deterministic split of calibration batches (or a
    problem's rows) over ranks.

    :param count: how many items
    :param parts: how many ranges (at least 1)
    """
    if parts < 1:
        raise ValueError(f"parts must be at least 1, got {parts}")
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for part in range(parts):
        stop = start + base + (1 if part < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def share_of(items: Sequence[Any]) -> list[Any]:
    """This rank's contiguous share of ``items`` (``split_evenly``); all of them in one
    process. Every item goes to exactly one rank."""
    mine = split_evenly(len(items), world_size())[rank()]
    return [items[i] for i in mine]


def assign_by_cost(costs: Sequence[float], parts: int | None = None) -> list[int]:
    """The rank that does each job, balancing the summed cost: jobs in decreasing cost, each
    to the least loaded rank so far (ties: the lower rank, then the earlier job), so every
    rank computes the same assignment.

    :param costs: one cost per job (e.g. a solve's operation count)
    :param parts: how many ranks; this process group's size by default
    :return: the owning rank of each job, in the order of ``costs``
    """
    parts = world_size() if parts is None else parts
    loads = [0.0] * parts
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        owner = min(range(parts), key=lambda r: (loads[r], r))
        owners[job] = owner
        loads[owner] += costs[job]
    return owners


def broadcast_parts(parts: Iterable[tuple[torch.Tensor, int]]) -> None:
    """Copy each ``(tensor, owner)``'s values from rank ``owner`` into every rank's tensor, in
    place: results computed by the rank that owned the work. Bytes travel as they are (any
    dtype, exactly); each tensor must be contiguous (a row range of a contiguous tensor is),
    and every rank must pass the same shapes in the same order."""
    if not is_distributed():
        return
    for tensor, owner in parts:
        if tensor.numel() == 0:
            continue
        if not tensor.is_contiguous():
            raise ValueError("broadcast_parts needs contiguous tensors (rows of a tensor)")
        flat = tensor.detach().reshape(-1)
        data = flat.view(torch.uint8) if flat.element_size() > 1 else flat
        device = _backend_device(data)
        if device == data.device:
            dist.broadcast(data, src=owner)
        else:  # a CPU tensor under NCCL travels through this process's CUDA device
            moved = data.to(device)
            dist.broadcast(moved, src=owner)
            data.copy_(moved.cpu())


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on any rank (this rank's ``flag`` in one process).

    :param device: where the one-element reduction runs (the backend's device: CUDA for NCCL)
    """
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    return bool(all_reduce_(value, "max").item())


_NEUTRAL = {"sum": 0.0, "max": -float("inf"), "min": float("inf")}


def reduce_optional(
    local: torch.Tensor | None,
    shape: Sequence[int],
    op: Literal["sum", "max", "min"],
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """A statistic that only some ranks may hold (a module no batch of this rank reached),
    reduced over the ranks that hold it; None when none does. ``local`` is not changed.

    :param local: this rank's value, or None
    :param shape: its shape (known alike on every rank: the module's width)
    :param op: ``sum``, ``max`` or ``min``; a rank without a value adds that op's neutral
        element
    :param device: where a rank without a value builds it (the backend's device)
    :param dtype: its dtype then
    """
    if not is_distributed():
        return local
    where = local.device if local is not None else torch.device(device)
    if not any_rank(local is not None, where):
        return None
    buffer = (
        local.detach().clone()
        if local is not None
        else torch.full(tuple(shape), _NEUTRAL[op], dtype=dtype, device=where)
    )
    return all_reduce_(buffer, op)
