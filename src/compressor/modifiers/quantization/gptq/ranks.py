"""GPTQ and SparseGPT under a process group (``oneshot`` under ``torchrun``), where each rank
calibrates on its share of the rows: the Hessians over every rank's data, and the solves
shared out over the ranks, their results broadcast.

Each rank holds ``H_r = 2/n_r sum x x^T`` over its ``n_r`` tokens; the Hessian over all of
them is ``sum_r n_r H_r / sum_r n_r``: the ranks add ``n_r H_r`` and the counts. That equals
the one-process Hessian up to the order of float32 additions (the one-process running mean is
rescaled batch by batch; here each rank's part is, then the parts are added).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy

from compressor.modifiers.quantization.gptq.gptq import GPTQResult
from compressor.modifiers.quantization.gptq.hessian import SharedHessians
from compressor.utils import distributed

__all__ = ["reduce_hessians", "solve_gptq_shared"]

_Problem = tuple[Sequence[Any], torch.Tensor]
"""A GPTQ problem: its weights (rows stacked) and its Hessian."""


def reduce_hessians(
    hessians: SharedHessians, names: list[str], modules: Mapping[str, torch.nn.Module]
) -> list[str]:
    """Make the Hessians of ``names`` those over every rank's data, the same on every rank;
    in one process, nothing changes.

    Every rank calls this with the same ``names`` (known from the model, not from the data) at
    the same point. Linears sharing one Hessian (q/k/v) are reduced once, as one set, when
    every rank formed the same sets; otherwise (ranks whose data took different paths) each
    Linear is reduced alone. A rank that saw no input of a Linear adds zeros.

    :param hessians: this rank's Hessians
    :param names: the Linears to reduce, in the same order on every rank
    :param modules: the Linears by name (a rank without a Hessian builds zeros on its weight's
        device)
    :return: those of ``names`` with a Hessian now (some rank saw data), in ``names``' order
    """
    if not distributed.is_distributed():
        return [name for name in names if name in hessians]
    local = hessians.sets_within(names)
    everyone = distributed.all_gather_object(local)
    if all(sets == everyone[0] for sets in everyone):
        jobs = everyone[0]
    else:  # the ranks formed different sets: one Hessian per Linear
        seen = {name for sets in everyone for members in sets for name in members}
        for name in names:
            hessians.separate(name)
        jobs = [[name] for name in names if name in seen]
    reduced: set[str] = set()
    for members in jobs:
        weight = modules[members[0]].weight
        assert isinstance(weight, torch.Tensor)
        if members[0] in hessians:
            hessian, count = hessians[members[0]]
            total = hessian.mul_(count)  # the set's own tensor: replaced below
        else:
            width = weight.shape[1]
            total = torch.zeros(width, width, dtype=hessians.dtype, device=weight.device)
            count = 0
        counts = torch.tensor([count], dtype=torch.int64, device=total.device)
        distributed.all_reduce_(total, "sum")
        everywhere = int(distributed.all_reduce_(counts, "sum").item())
        if everywhere == 0:
            continue
        total.div_(everywhere)
        hessians.replace(members, total, everywhere)
        reduced.update(members)
    return [name for name in names if name in reduced]


def solve_gptq_shared(
    problems: Sequence[_Problem],
    args: QuantizationArgs,
    solve: Callable[[list[_Problem]], list[GPTQResult]],
) -> list[GPTQResult]:
    """Solve GPTQ problems with the work shared out over the ranks; every rank returns every
    problem's result, bit for bit the same.

    With row-wise scales (channel, group) GPTQ treats each output row alone given the inverse
    Hessian and the column order (both from the Hessian, the same on every rank), so each rank
    solves its contiguous share of every problem's rows (the column loop is split; the
    inversion is repeated on each rank, which where the Hessian is wider than the weight is
    tall, as for down_proj, is most of the solve: bench/results/2026-12-01-oneshot-ranks.md);
    the rows are then broadcast from the rank that solved them. A per-tensor scale needs the
    whole weight: whole problems are shared out by cost (rows x columns^2), as are problems
    with fewer rows than ranks. In one process this is ``solve(problems)``.

    :param problems: ``(weights, hessian)`` pairs, the same on every rank (Hessians reduced)
    :param args: the weights' quantization
    :param solve: solves a list of problems in lockstep (``gptq_quantize_weights``)
    :return: one result per problem; ``loss`` summed over the ranks' rows
    """
    if not distributed.is_distributed():
        return solve(list(problems))
    world, me = distributed.world_size(), distributed.rank()
    rows = [sum(w.shape[0] for w in weights) for weights, _ in problems]
    by_rows = args.strategy in (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP)
    split = [by_rows and count >= world for count in rows]
    owners = distributed.assign_by_cost(
        [
            float(count) * weights[0].shape[1] ** 2
            for count, (weights, _) in zip(rows, problems, strict=True)
        ]
    )
    mine: list[tuple[int, _Problem]] = []
    for index, ((weights, hessian), count) in enumerate(zip(problems, rows, strict=True)):
        if split[index]:
            share = distributed.split_evenly(count, world)[me]
            mine.append((index, (_row_range(weights, share.start, share.stop), hessian)))
        elif owners[index] == me:
            mine.append((index, (weights, hessian)))
    solved = (
        dict(zip([i for i, _ in mine], solve([p for _, p in mine]), strict=True)) if mine else {}
    )
    # what every rank needs to receive the others' results: shapes, dtypes, losses
    described = {
        index: (
            [(tuple(t.shape), t.dtype) for t in (r.weight, r.scale, r.zero_point)],
            r.loss,
            r.dampening_frac,
        )
        for index, r in solved.items()
    }
    everyone = distributed.all_gather_object(described)
    results, parts = [], []
    for index, count in enumerate(rows):
        device = problems[index][0][0].device
        if split[index]:
            ranges = distributed.split_evenly(count, world)
            layout = everyone[0][index][0]  # rank 0 always holds a share
            buffers = []
            for position, (shape, dtype) in enumerate(layout):  # all row-wise: (rows, ...)
                full = torch.empty((count, *shape[1:]), dtype=dtype, device=device)
                own = ranges[me]
                full[own.start : own.stop].copy_(_field(solved[index], position))
                parts += [(full[r.start : r.stop], rank) for rank, r in enumerate(ranges)]
                buffers.append(full)
            loss = sum(float(each[index][1]) for each in everyone)
            damp = max(float(each[index][2]) for each in everyone)
        else:
            owner = owners[index]
            layout, loss, damp = everyone[owner][index]
            buffers = []
            for position, (shape, dtype) in enumerate(layout):
                if owner == me:
                    full = _field(solved[index], position).contiguous()
                else:
                    full = torch.empty(shape, dtype=dtype, device=device)
                parts.append((full, owner))
                buffers.append(full)
        results.append(GPTQResult(buffers[0], buffers[1], buffers[2], loss, damp))
    distributed.broadcast_parts(parts)
    return results


def _field(result: GPTQResult, position: int) -> torch.Tensor:
    return (result.weight, result.scale, result.zero_point)[position]


def _row_range(weights: Sequence[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
    """Rows ``start:stop`` of the weights stacked, as views of each weight's part."""
    parts, offset = [], 0
    for weight in weights:
        low, high = max(start, offset), min(stop, offset + weight.shape[0])
        if low < high:
            parts.append(weight[low - offset : high - offset])
        offset += weight.shape[0]
    return parts
