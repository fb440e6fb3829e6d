"""The numeric core of GPTQ: block-wise column quantization with error feedback.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers") quantizes a Linear weight one input column at a time
and spreads each column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian ``H = 2/n sum x x^T`` of the layer's inputs. This minimises ``||WX - QX||^2``
far better than rounding every weight to its nearest grid point.

Everything here is a pure function of tensors; the modifier in ``base.py`` only collects inputs
and writes the results into the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams, calculate_range

from compressor.modifiers.quantization.gptq.hessian import inverse_hessian_cholesky

__all__ = [
    "ActOrder",
    "GPTQResult",
    "gptq_quantize_weight",
    "gptq_quantize_weights",
    "round_to_nearest",
]

ActOrder = Literal["static"]
"""Activation ordering: ``static`` quantizes columns in order of decreasing Hessian diagonal with
scales fixed up front on the contiguous groups (same checkpoint format as no reordering).
Groups formed in that order would need a ``g_idx`` (column -> group) tensor, which
compressed-tensors' checkpoint format no longer has; ``GPTQModifier`` refuses them."""

_SUB_BLOCK = 16
"""Columns per inner sub-block of GPTQ's two-level lazy updates (see the loop)."""

SUPPORTED_STRATEGIES = (
    QuantizationStrategy.TENSOR,
    QuantizationStrategy.CHANNEL,
    QuantizationStrategy.GROUP,
)


@dataclass
class GPTQResult:
    """What GPTQ returns for one weight.

    :param weight: the quantized weight, dequantized (every value lies on the grid given by
        ``scale`` and ``zero_point``), in the input weight's dtype and column order
    :param scale: per tensor ``(1,)``, per channel ``(rows, 1)`` or per group
        ``(rows, num_groups)``
    :param zero_point: same shape as ``scale`` (zeros when symmetric)
    :param loss: GPTQ's estimate of the added squared error, ``sum (w - q)^2 / [H^-1]_jj / 2``
    :param dampening_frac: the dampening that made the Hessian invertible (may exceed the
        requested one)
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    loss: float
    dampening_frac: float


class _Threads:
    """The CPU threads of GPTQ's column loop: one, except inside ``all()``."""

    def __init__(self, previous: int) -> None:
        self.previous = previous

    @contextlib.contextmanager
    def all(self) -> Iterator[None]:
        """The caller's thread count back, for a large matrix product."""
        if self.previous == 1:
            yield
            return
        torch.set_num_threads(self.previous)
        try:
            yield
        finally:
            torch.set_num_threads(1)


@contextlib.contextmanager
def _few_threads(tensor: torch.Tensor) -> Iterator[_Threads]:
    """Run GPTQ's column loop on one CPU thread.

    The loop is thousands of small tensor operations; on CPU, spreading each over OpenMP
    threads costs more in synchronisation than it saves, and on a busy machine every barrier
    waits for a descheduled thread. Each block's update of the later columns is one large
    matrix product, which takes every thread again (``_Threads.all``). The previous thread
    count is restored afterwards. Measurements: bench/results/2026-12-01-notes-gptq-memory.md.
    """
    previous = torch.get_num_threads()
    if tensor.device.type != "cpu" or previous == 1:
        yield _Threads(1)
        return
    torch.set_num_threads(1)
    try:
        yield _Threads(previous)
    finally:
        torch.set_num_threads(previous)


def _qparams(columns: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point of each row of ``columns`` (``(rows, k)``)."""
    return calculate_qparams(columns.amin(dim=1), columns.amax(dim=1), args)


def _column_rounder(args: QuantizationArgs) -> Callable[..., torch.Tensor]:
    """A function ``(column, scale, zero, out=None) -> dequantized column`` for 1-D
    ``(rows,)`` tensors, the zero point given in the column's floating dtype (ignored, and may
    be None, for symmetric integer grids, whose zero point is 0).

    GPTQ rounds thousands of single columns, so the per-call overhead matters more than the
    arithmetic. Integer grids use the same arithmetic as compressed-tensors' fake quantization
    (scale, shift by the zero point, clamp, round, shift back, rescale), done inline in a few
    tensor operations, so the result is bit-identical to it; other types (floating-point
    grids) call compressed-tensors itself.
    """
    column_args = QuantizationArgs(
        num_bits=args.num_bits,
        type=args.type,
        symmetric=args.symmetric,
        strategy=QuantizationStrategy.CHANNEL,
    )
    if args.type != QuantizationType.INT:

        def generic(
            column: torch.Tensor, s: torch.Tensor, z: torch.Tensor, out: torch.Tensor | None = None
        ) -> torch.Tensor:
            q = fake_quantize(column.unsqueeze(1), s.unsqueeze(1), z.unsqueeze(1), column_args)
            return q.squeeze(1) if out is None else out.copy_(q.squeeze(1))

        return generic
    q_min, q_max = calculate_range(column_args, torch.device("cpu"))
    low, high = float(q_min), float(q_max)

    if args.symmetric:  # zero point 0: the same values with two operations fewer

        def symmetric(
            column: torch.Tensor, s: torch.Tensor, _zf: Any = None, out: torch.Tensor | None = None
        ) -> torch.Tensor:
            levels = torch.div(column, s, out=out) if out is not None else torch.div(column, s)
            levels.clamp_(low, high).round_()
            return levels.mul_(s)

        return symmetric

    def integer(
        column: torch.Tensor, s: torch.Tensor, zf: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        # column / s + zero point, as compressed-tensors; into ``out`` when given
        levels = (
            torch.addcdiv(zf, column, s, out=out)
            if out is not None
            else torch.addcdiv(zf, column, s)
        )
        levels.clamp_(low, high).round_()
        return levels.sub_(zf).mul_(s)

    return integer


def _check(weight: torch.Tensor, args: QuantizationArgs, block_size: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"GPTQ quantizes 2-D weights, got shape {tuple(weight.shape)}")
    if args.strategy not in SUPPORTED_STRATEGIES or args.dynamic:
        allowed = ", ".join(s.value for s in SUPPORTED_STRATEGIES)
        raise ValueError(
            f"GPTQ supports static weight strategies {allowed}; got strategy={args.strategy!r}"
            f" dynamic={args.dynamic!r}"
        )
    if args.strategy == QuantizationStrategy.GROUP and weight.shape[1] % args.group_size:
        raise ValueError(
            f"group_size={args.group_size} does not divide the {weight.shape[1]} input "
            "columns of the weight; choose a divisor or strategy 'channel'"
        )
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")


def round_to_nearest(
    weight: torch.Tensor, args: QuantizationArgs
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest with min-max scales: the baseline GPTQ improves on.

    :return: the fake-quantized weight, its scale and zero point (shapes as in GPTQResult)
    """
    _check(weight, args, 1)
    w = weight.float()
    if args.strategy == QuantizationStrategy.TENSOR:
        scale, zero = calculate_qparams(w.amin(), w.amax(), args)
    elif args.strategy == QuantizationStrategy.CHANNEL:
        scale, zero = _qparams(w, args)
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
    else:
        grouped = w.unflatten(1, (-1, args.group_size))
        scale, zero = calculate_qparams(grouped.amin(dim=2), grouped.amax(dim=2), args)
    return fake_quantize(w, scale, zero, args).to(weight.dtype), scale, zero


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor | Sequence[torch.Tensor],
    hessian: torch.Tensor,
    args: QuantizationArgs,
    *,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: ActOrder | None = None,
    overwrite_hessian: bool = False,
) -> GPTQResult:
    """Quantize a ``(rows, columns)`` weight with GPTQ.

    Columns are quantized in blocks of ``block_size``; inside a block each column's error is
    fed back to the block's later columns at once, and the whole block's error to the columns
    after it with one matrix product (the paper's lazy batch updates). Columns whose Hessian
    diagonal is zero (inputs always zero) are dead: their weight is set to zero.

    Scales come from min-max of the weights being quantized: per tensor and per channel from
    the whole weight up front; per group when the group's first column is reached, from the
    group's current (error-updated) columns, except with ``actorder="static"``, where every
    group's scale is fixed up front so the groups stay contiguous in the original order.

    :param weight: the Linear's weight (not modified); or several weights with the same
        columns and one Hessian (q/k/v projections), quantized as one problem with their rows
        stacked (the result holds them in that order), without a stacked copy of them
    :param hessian: ``(columns, columns)`` Hessian of the Linear's inputs
    :param args: compressed-tensors quantization args (int or float; tensor, channel or group)
    :param block_size: columns per lazy-update block
    :param dampening_frac: fraction of the mean Hessian diagonal added to its diagonal
    :param actorder: None or ``"static"`` (see ``ActOrder``)
    :param overwrite_hessian: the caller no longer needs ``hessian``: it may be changed in
        place instead of copied (saves two matrices of memory on the largest layers)
    """
    (result,) = gptq_quantize_weights(
        [(weight, hessian)],
        args,
        block_size=block_size,
        dampening_frac=dampening_frac,
        actorder=actorder,
        overwrite_hessian=overwrite_hessian,
    )
    return result


@dataclass
class _Problem:
    """One problem of a lockstep solve: its rows in the shared buffer and its own Hessian."""

    weights: list[torch.Tensor]
    rows: slice
    hinv: torch.Tensor | None = None
    dampening_frac: float = 0.0
    perm: torch.Tensor | None = None
    fixed_scale: torch.Tensor | None = None
    fixed_zero: torch.Tensor | None = None
    col_group: torch.Tensor | None = None  # group of each position, with fixed scales
    scale: torch.Tensor | None = None  # found in the column loop (no fixed scales)
    zero: torch.Tensor | None = None
    loss: float = 0.0


@torch.no_grad()
def gptq_quantize_weights(
    problems: Sequence[tuple[torch.Tensor | Sequence[torch.Tensor], torch.Tensor]],
    args: QuantizationArgs,
    *,
    block_size: int = 128,
    dampening_frac: float = 0.01,
    actorder: ActOrder | None = None,
    overwrite_hessian: bool = False,
) -> list[GPTQResult]:
    """Quantize several independent GPTQ problems with the same columns in lockstep.

    Each problem is a weight (or stacked weights) and its own Hessian, as for
    ``gptq_quantize_weight``; the results are what it gives for each one alone. The column
    loop runs once for all of them: their rows are stacked in one buffer, so rounding a
    column, the bulk of GPTQ's thousands of small operations, is one set of operations for
    every problem; only the error feedback, which depends on each problem's inverse Hessian,
    is done per problem. (A decoder layer's q/k/v, o and gate/up problems read inputs of the
    same width, so they share one column loop; the saving is in
    bench/results/2026-12-01-notes-gptq-memory.md.)

    :param problems: ``(weight or weights, hessian)`` pairs with the same number of columns
    :param args: compressed-tensors quantization args shared by every problem
    :param block_size: columns per lazy-update block
    :param dampening_frac: fraction of the mean Hessian diagonal added to its diagonal
    :param actorder: None or ``"static"`` (see ``ActOrder``)
    :param overwrite_hessian: the caller no longer needs the Hessians (see
        ``gptq_quantize_weight``)
    :return: one result per problem, in order
    """
    if not problems:
        raise ValueError("no problem to quantize")
    parts = [[w] if isinstance(w, torch.Tensor) else list(w) for w, _ in problems]
    if not all(parts):
        raise ValueError("no weight to quantize")
    for part in (p for weights in parts for p in weights):
        _check(part, args, block_size)
    columns = parts[0][0].shape[1]
    if any(p.shape[1] != columns for weights in parts for p in weights):
        shapes = [[tuple(p.shape) for p in weights] for weights in parts]
        raise ValueError(f"stacked weights must have the same input columns, got {shapes}")
    for _, hessian in problems:
        if hessian.shape != (columns, columns):
            raise ValueError(
                f"the Hessian is {tuple(hessian.shape)}, the weight has {columns} input columns"
            )
    if actorder not in (None, "static"):
        raise ValueError(f"actorder must be None or 'static'; got {actorder!r}")
    grouped = args.strategy == QuantizationStrategy.GROUP
    group_size = args.group_size if grouped else columns

    # Work on the transpose, built in one copy: each input column is then one contiguous row,
    # which makes the thousands of per-column operations below several times cheaper. Each
    # problem owns a range of the buffer's columns (its weights' rows).
    device = parts[0][0].device
    rows = sum(p.shape[0] for weights in parts for p in weights)
    wt = torch.empty(columns, rows, dtype=torch.float32, device=device)
    solved: list[_Problem] = []
    first = 0
    for weights in parts:
        begin = first
        for part in weights:
            wt[:, first : first + part.shape[0]].copy_(part.detach().t())
            first += part.shape[0]
        solved.append(_Problem(weights=weights, rows=slice(begin, first)))

    for problem, (_, hessian) in zip(solved, problems, strict=True):
        mine = wt[:, problem.rows]
        h = hessian.detach().to(device=device, dtype=torch.float32)
        if h.data_ptr() == hessian.data_ptr() and not overwrite_hessian:
            h = h.clone()  # the caller's Hessian stays as it was
        dead = h.diagonal() == 0
        if bool(dead.any()):
            h[dead, dead] = 1.0
            mine[dead] = 0.0

        # scales that are fixed before any column is quantized
        if args.strategy == QuantizationStrategy.TENSOR:
            scale, zero = calculate_qparams(mine.amin(), mine.amax(), args)
            count = problem.rows.stop - problem.rows.start
            problem.fixed_scale = scale.reshape(1, 1).expand(count, 1)
            problem.fixed_zero = zero.reshape(1, 1).expand(count, 1)
        elif not grouped or actorder == "static":
            # per row and group of columns: (groups, group_size, rows) reduced over the group
            by_group = mine.unflatten(0, (columns // group_size, group_size))
            low, high = by_group.amin(dim=1).t(), by_group.amax(dim=1).t()  # (rows, groups)
            scale, zero = calculate_qparams(low.reshape(-1), high.reshape(-1), args)
            problem.fixed_scale = scale.reshape(low.shape)
            problem.fixed_zero = zero.reshape(low.shape)

        if actorder is not None:
            problem.perm = torch.argsort(h.diagonal(), descending=True)
            mine.copy_(mine.index_select(0, problem.perm))
            # h is ours (a copy, or the caller's given up): permuted in place, one axis at a
            # time, so no second Hessian-sized matrix outlives a line (``index_select`` is
            # several times faster than indexing both axes at once)
            h.copy_(h.index_select(0, problem.perm))
            h.copy_(h.index_select(1, problem.perm))
        if problem.fixed_scale is not None:
            # (group_size is the whole width for tensor and channel scales: one group)
            order = problem.perm if problem.perm is not None else torch.arange(columns)
            problem.col_group = (order // group_size).to(device)
        # the inverse's factor takes h's memory
        problem.hinv, problem.dampening_frac = inverse_hessian_cholesky(
            h, dampening_frac, overwrite=True
        )
        del h, mine

    _lockstep_columns(wt, solved, args, block_size, group_size)

    results = []
    for problem in solved:
        if problem.perm is None:
            quantized = wt[:, problem.rows].t()
        else:
            inverse = torch.argsort(problem.perm)
            quantized = wt[:, problem.rows].index_select(0, inverse).t()
        scale, zero = problem.fixed_scale, problem.fixed_zero
        if scale is None:
            scale, zero = problem.scale, problem.zero
        assert scale is not None and zero is not None
        if args.strategy == QuantizationStrategy.TENSOR:
            scale, zero = scale[:1].reshape(1), zero[:1].reshape(1)
        results.append(
            GPTQResult(
                weight=quantized.to(problem.weights[0].dtype),
                scale=scale,
                zero_point=zero.to(args.zp_dtype),
                loss=problem.loss,
                dampening_frac=problem.dampening_frac,
            )
        )
    return results


def _lockstep_columns(
    wt: torch.Tensor,
    problems: list[_Problem],
    args: QuantizationArgs,
    block_size: int,
    group_size: int,
) -> None:
    """GPTQ's column loop over ``wt`` (``(columns, rows)``, each problem owning a range of its
    rows, already permuted), in place: ``wt`` ends up quantized. Sets each problem's loss and,
    without fixed scales, its group scales."""
    columns, rows = wt.shape
    device = wt.device
    fixed = problems[0].fixed_scale is not None
    # fixed scales as (groups, rows) tables: a position's scales are one table row per
    # problem; when every problem maps positions to groups alike (no reordering, or one
    # problem), each position just views the joint table's row
    tables: list[tuple[torch.Tensor, torch.Tensor]] = []
    joint: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    position_group: list[int] = []
    # symmetric integer grids round without their zero point (all zeros): not gathered
    zero_free = args.symmetric and args.type == QuantizationType.INT
    if fixed:
        for problem in problems:
            assert problem.fixed_scale is not None and problem.fixed_zero is not None
            tables.append(
                (
                    problem.fixed_scale.t().contiguous(),
                    problem.fixed_zero.t().to(wt.dtype).contiguous(),
                )
            )
            if zero_free and tables[-1][1].any():
                raise AssertionError("a symmetric grid with a non-zero zero point")
        col_groups = [p.col_group for p in problems]
        if all(torch.equal(g, col_groups[0]) for g in col_groups[1:]):  # type: ignore[arg-type]
            joint = list(
                zip(
                    torch.cat([t[0] for t in tables], dim=1).unbind(0),
                    torch.cat([t[1] for t in tables], dim=1).unbind(0),
                    strict=True,
                )
            )
            position_group = problems[0].col_group.tolist()  # type: ignore[union-attr]
    num_groups = columns // group_size
    scale = torch.empty(rows, num_groups, device=device)
    zero = torch.empty(rows, num_groups, device=device, dtype=args.zp_dtype)
    round_column = _column_rounder(args)
    losses = torch.zeros(rows, device=device)
    current_scale = current_zero = None
    # Two levels of lazy updates: inside a block, each column's error reaches the rest of its
    # small sub-block at once (rank-1) and the rest of the block once per sub-block (one
    # matrix product); the block's error reaches later blocks once per block. Sub-blocks
    # never straddle a group start, so a group's scale sees fully updated columns.
    inner = math.gcd(_SUB_BLOCK, block_size, group_size)
    with _few_threads(wt) as threads:
        for start in range(0, columns, block_size):
            stop = min(start + block_size, columns)
            width = stop - start
            block = wt[start:stop].clone()  # (columns in block, rows)
            block_err = torch.empty_like(block)
            # the block's quantized columns go straight into ``wt``, free since the clone
            block_q = wt[start:stop]
            if fixed and joint is None:  # each position's scales, gathered once per block
                block_scale = torch.empty_like(block)
                block_zero = block_scale if zero_free else torch.empty_like(block)  # unread
                for problem, (scale_table, zero_table) in zip(problems, tables, strict=True):
                    assert problem.col_group is not None
                    where = problem.col_group[start:stop]
                    block_scale[:, problem.rows] = scale_table.index_select(0, where)
                    if not zero_free:
                        block_zero[:, problem.rows] = zero_table.index_select(0, where)
                scales, zeros = block_scale.unbind(0), block_zero.unbind(0)
            block_hinv = [p.hinv[start:stop, start:stop] for p in problems]  # type: ignore[index]
            block_diag = [h.diagonal().unsqueeze(1) for h in block_hinv]
            diagonal = [d.squeeze(1).tolist() for d in block_diag]
            # per-column views made once per block: indexing costs as much as a small kernel
            rows_w, rows_q, rows_e = block.unbind(0), block_q.unbind(0), block_err.unbind(0)
            errors = [block_err[:, p.rows].unbind(0) for p in problems]
            for sub in range(0, width, inner):
                sub_end = min(sub + inner, width)
                # each column's error reaches the whole sub-block through its Hessian row with
                # zeros up to its own position: the rows already quantized (and its own) get
                # exact zeros added, so one view serves every column
                targets = [block[sub:sub_end, p.rows] for p in problems]
                feedback = [h[sub:sub_end, sub:sub_end].triu(1).unbind(0) for h in block_hinv]
                for i in range(sub, sub_end):
                    col = start + i  # position in the (possibly permuted) order
                    if joint is not None:
                        s, zf = joint[position_group[col]]
                    elif fixed:
                        s, zf = scales[i], zeros[i]
                    elif col % group_size == 0:  # a group starts: scale its current columns
                        end = col + group_size
                        current = torch.cat([block[i : i + group_size], wt[stop:end]])
                        current_scale, current_zero = _qparams(current.t(), args)
                        g = col // group_size
                        scale[:, g], zero[:, g] = current_scale, current_zero
                        s, zf = current_scale, current_zero.to(block.dtype)
                    column = rows_w[i]
                    q = round_column(column, s, zf, out=rows_q[i])
                    # the raw rounding error; scaled by 1 / [H^-1]_ii once per sub-block below
                    torch.sub(column, q, out=rows_e[i])
                    if i + 1 < sub_end:  # this column's error to the rest of its sub-block
                        for p in range(len(problems)):
                            targets[p].addr_(
                                feedback[p][i - sub], errors[p][i], alpha=-1.0 / diagonal[p][i]
                            )
                for problem, diag, h in zip(problems, block_diag, block_hinv, strict=True):
                    mine = block_err[sub:sub_end, problem.rows]
                    mine.div_(diag[sub:sub_end])
                    if sub_end < width:  # the sub-block's errors to the rest of the block
                        block[sub_end:, problem.rows].addmm_(
                            h[sub:sub_end, sub_end:].t(), mine, alpha=-1.0
                        )
            with threads.all():  # large operations: on every thread
                # each column's loss is (w - q)^2 / d^2 / 2 = err^2 / 2
                losses += block_err.square().sum(dim=0) / 2
                if stop < columns:  # the block's error to the later columns
                    for problem in problems:
                        assert problem.hinv is not None
                        wt[stop:, problem.rows].addmm_(
                            problem.hinv[start:stop, stop:].t(),
                            block_err[:, problem.rows],
                            alpha=-1.0,
                        )
    for problem in problems:
        problem.loss = float(losses[problem.rows].sum())
        if not fixed:
            problem.scale, problem.zero = scale[problem.rows], zero[problem.rows]
        problem.hinv = None
