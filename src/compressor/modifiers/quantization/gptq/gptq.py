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
from typing import Any, Literal, Protocol

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

    Zeros the weight already has (a pruned weight) stay exactly zero: see
    ``gptq_quantize_weights``.

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
    hinv: torch.Tensor | None = None  # upper factor of the inverse Hessian, during the solve
    dampening_frac: float = 0.0
    perm: torch.Tensor | None = None  # the order its columns are quantized in (actorder)
    scale: torch.Tensor | None = None  # (rows, groups): fixed up front, or found by the loop
    zero: torch.Tensor | None = None
    col_group: torch.Tensor | None = None  # group of each position, with scales fixed up front
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

    **Zeros stay zero.** When a weight already has zeros (it was pruned), they are its mask:
    each pruned position is quantized to exactly zero, and only kept weights set the scales
    (min-max over the kept values; zero is always on the grid). This is SparseGPT's joint
    prune-and-quantize step with the mask fixed (Frantar & Alistarh, 2023, "SparseGPT:
    Massive Language Models Can Be Accurately Pruned in One-Shot"): pruned positions not yet reached still absorb compensation like any
    unfixed weight, and when the loop reaches one, setting it to zero is an OBS step like
    rounding is, its error (whatever compensation it absorbed) fed to the later columns. So
    every step stays the exact OBS update over the weights not yet fixed, and the result has
    every zero of the input. Whether a bundle has any zero is checked once, on the stacked
    weights; a dense bundle runs the loop without masking.

    :param problems: ``(weight or weights, hessian)`` pairs with the same number of columns
    :param args: compressed-tensors quantization args shared by every problem
    :param block_size: columns per lazy-update block
    :param dampening_frac: fraction of the mean Hessian diagonal added to its diagonal
    :param actorder: None or ``"static"`` (see ``ActOrder``)
    :param overwrite_hessian: the caller no longer needs the Hessians (see
        ``gptq_quantize_weight``)
    :return: one result per problem, in order
    """
    parts = _checked_weights(problems, args, block_size, actorder)
    wt, solved = _stack_transposed(parts)
    keep = _kept_positions(wt)
    columns = wt.shape[0]
    group_size = args.group_size if args.strategy == QuantizationStrategy.GROUP else columns
    for problem, (_, hessian) in zip(solved, problems, strict=True):
        _prepare(
            problem,
            wt[:, problem.rows],
            hessian,
            args,
            group_size=group_size,
            actorder=actorder,
            dampening_frac=dampening_frac,
            overwrite_hessian=overwrite_hessian,
            keep=None if keep is None else keep[:, problem.rows],
        )
    _lockstep_columns(wt, solved, args, block_size, group_size, keep)
    return [_result(problem, wt, args) for problem in solved]


def _checked_weights(
    problems: Sequence[tuple[torch.Tensor | Sequence[torch.Tensor], torch.Tensor]],
    args: QuantizationArgs,
    block_size: int,
    actorder: ActOrder | None,
) -> list[list[torch.Tensor]]:
    """Each problem's weights as a list, once every problem is known to be one that GPTQ can
    solve with the others: 2-D weights of one input width, square Hessians of that width."""
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
    return parts


def _stack_transposed(parts: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[_Problem]]:
    """Every problem's weights, transposed, side by side in one float32 ``(columns, rows)``
    buffer built in one copy; and the problems, each owning a range of the buffer's columns.

    On the transpose each input column is one contiguous row, which makes the thousands of
    per-column operations of the column loop several times cheaper.
    """
    first_weight = parts[0][0]
    rows = sum(p.shape[0] for weights in parts for p in weights)
    wt = torch.empty(first_weight.shape[1], rows, dtype=torch.float32, device=first_weight.device)
    problems: list[_Problem] = []
    first = 0
    for weights in parts:
        begin = first
        for part in weights:
            wt[:, first : first + part.shape[0]].copy_(part.detach().t())
            first += part.shape[0]
        problems.append(_Problem(weights=weights, rows=slice(begin, first)))
    return wt, problems


def _kept_positions(wt: torch.Tensor) -> torch.Tensor | None:
    """The positions of ``wt`` that are not zero, as 1.0 (kept) and 0.0 (pruned) in its dtype;
    None when no position is zero (a dense weight: the column loop needs no mask)."""
    keep = wt != 0
    if bool(keep.all()):
        return None
    return keep.to(wt.dtype)


def _prepare(
    problem: _Problem,
    mine: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantizationArgs,
    *,
    group_size: int,
    actorder: ActOrder | None,
    dampening_frac: float,
    overwrite_hessian: bool,
    keep: torch.Tensor | None = None,
) -> None:
    """What one problem needs before the column loop: dead columns zeroed, scales fixed up front
    (all but running group scales), its columns reordered (``actorder``), and the factor of its
    inverse Hessian, which takes the working Hessian's memory.

    :param mine: the problem's ``(columns, rows)`` part of the shared buffer, changed in place
    :param keep: the problem's part of the kept-positions mask (``_kept_positions``), reordered
        with its columns
    """
    h = _working_hessian(hessian, mine.device, overwrite_hessian)
    _zero_dead_columns_(h, mine)
    if args.strategy != QuantizationStrategy.GROUP or actorder is not None:
        problem.scale, problem.zero = _fixed_scales(mine, args, group_size)
    if actorder is not None:
        problem.perm = _order_by_hessian_diagonal_(h, mine)
        if keep is not None:
            keep.copy_(keep.index_select(0, problem.perm))
    if problem.scale is not None:
        # (group_size is the whole width for tensor and channel scales: one group)
        order = problem.perm if problem.perm is not None else torch.arange(mine.shape[0])
        problem.col_group = (order // group_size).to(mine.device)
    problem.hinv, problem.dampening_frac = inverse_hessian_cholesky(
        h, dampening_frac, overwrite=True
    )


def _working_hessian(hessian: torch.Tensor, device: torch.device, overwrite: bool) -> torch.Tensor:
    """``hessian`` in float32 on ``device``, ours to change: the caller's own tensor only when
    it gave it up (``overwrite``), else a copy."""
    h = hessian.detach().to(device=device, dtype=torch.float32)
    if h.data_ptr() == hessian.data_ptr() and not overwrite:
        h = h.clone()  # the caller's Hessian stays as it was
    return h


def _zero_dead_columns_(h: torch.Tensor, mine: torch.Tensor) -> None:
    """Columns whose Hessian diagonal is zero (inputs always zero) are dead: their weights
    become zero, and their diagonal one so that ``h`` stays invertible."""
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        mine[dead] = 0.0


def _fixed_scales(
    mine: torch.Tensor, args: QuantizationArgs, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scales and zero points fixed before any column is quantized, ``(rows, groups)``
    (the groups contiguous in the original column order): per tensor, per channel (one group
    of every column) or per group."""
    if args.strategy == QuantizationStrategy.TENSOR:
        scale, zero = calculate_qparams(mine.amin(), mine.amax(), args)
        count = mine.shape[1]
        return scale.reshape(1, 1).expand(count, 1), zero.reshape(1, 1).expand(count, 1)
    # per row and group of columns: (groups, group_size, rows) reduced over the group
    by_group = mine.unflatten(0, (mine.shape[0] // group_size, group_size))
    low, high = by_group.amin(dim=1).t(), by_group.amax(dim=1).t()  # (rows, groups)
    scale, zero = calculate_qparams(low.reshape(-1), high.reshape(-1), args)
    return scale.reshape(low.shape), zero.reshape(low.shape)


def _order_by_hessian_diagonal_(h: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """Reorder the columns of ``mine`` and both axes of ``h``, in place, by decreasing Hessian
    diagonal (activation order); return the permutation."""
    perm = torch.argsort(h.diagonal(), descending=True)
    mine.copy_(mine.index_select(0, perm))
    # h is ours (a copy, or the caller's given up): permuted in place, one axis at a time, so
    # no second Hessian-sized matrix outlives a line (``index_select`` is several times faster
    # than indexing both axes at once)
    h.copy_(h.index_select(0, perm))
    h.copy_(h.index_select(1, perm))
    return perm


def _result(problem: _Problem, wt: torch.Tensor, args: QuantizationArgs) -> GPTQResult:
    """The problem's quantized weight, back in its input order and dtype, with its scales."""
    quantized = wt[:, problem.rows]
    if problem.perm is not None:
        quantized = quantized.index_select(0, torch.argsort(problem.perm))
    scale, zero = problem.scale, problem.zero
    assert scale is not None and zero is not None
    if args.strategy == QuantizationStrategy.TENSOR:
        scale, zero = scale[:1].reshape(1), zero[:1].reshape(1)
    return GPTQResult(
        weight=quantized.t().to(problem.weights[0].dtype),
        scale=scale,
        zero_point=zero.to(args.zp_dtype),
        loss=problem.loss,
        dampening_frac=problem.dampening_frac,
    )


def _lockstep_columns(
    wt: torch.Tensor,
    problems: list[_Problem],
    args: QuantizationArgs,
    block_size: int,
    group_size: int,
    keep: torch.Tensor | None = None,
) -> None:
    """GPTQ's column loop over ``wt`` (``(columns, rows)``, each problem owning a range of its
    rows, already permuted), in place: ``wt`` ends up quantized. Sets each problem's loss and,
    without fixed scales, its group scales. Positions where ``keep`` (same layout) is 0 are
    quantized to zero (see ``gptq_quantize_weights``)."""
    columns, rows = wt.shape
    scales = _scale_lookup(wt, problems, args, group_size, keep)
    round_column = _column_rounder(args)
    losses = torch.zeros(rows, device=wt.device)
    # Two levels of lazy updates: inside a block, each column's error reaches the rest of its
    # small sub-block at once (rank-1) and the rest of the block once per sub-block (one
    # matrix product); the block's error reaches later blocks once per block. Sub-blocks
    # never straddle a group start, so a group's scale sees fully updated columns.
    inner = math.gcd(_SUB_BLOCK, block_size, group_size)
    with _few_threads(wt) as threads:
        for start in range(0, columns, block_size):
            block = _Block(wt, problems, start, min(start + block_size, columns), keep)
            scales.start_block(block)
            for sub in range(0, block.width, inner):
                sub_end = min(sub + inner, block.width)
                column_scales = scales.of_positions(start + sub, start + sub_end)
                _round_sub_block(block, sub, sub_end, column_scales, round_column)
                _feed_sub_block_error(block, sub, sub_end)
            with threads.all():  # large operations: on every thread
                # each column's loss is (w - q)^2 / d^2 / 2 = err^2 / 2
                losses += block.err.square().sum(dim=0) / 2
                _feed_block_error(wt, problems, block)
    for problem in problems:
        problem.loss = float(losses[problem.rows].sum())
        if isinstance(scales, _RunningGroupScales):
            problem.scale, problem.zero = scales.scale[problem.rows], scales.zero[problem.rows]
        problem.hinv = None


class _Block:
    """Columns ``start:stop`` of the buffer in the column loop, and the views of them that the
    loop reads, made once per block: indexing costs as much as a small kernel."""

    def __init__(
        self,
        wt: torch.Tensor,
        problems: list[_Problem],
        start: int,
        stop: int,
        keep: torch.Tensor | None = None,
    ) -> None:
        self.start, self.stop, self.width = start, stop, stop - start
        self.rows = [p.rows for p in problems]
        self.work = wt[start:stop].clone()  # (columns in block, rows), error-updated
        self.err = torch.empty_like(self.work)
        # the block's quantized columns go straight into ``wt``, free since the clone
        self.quantized = wt[start:stop]
        self.hinv = [p.hinv[start:stop, start:stop] for p in problems]  # type: ignore[index]
        self.hinv_diag = [h.diagonal().unsqueeze(1) for h in self.hinv]
        self.hinv_diag_values = [d.squeeze(1).tolist() for d in self.hinv_diag]
        # per-column views
        self.work_columns = self.work.unbind(0)
        self.quantized_columns = self.quantized.unbind(0)
        self.err_columns = self.err.unbind(0)
        self.problem_err_columns = [self.err[:, r].unbind(0) for r in self.rows]
        # 1.0 where a weight is kept, 0.0 where it was pruned; None for dense weights
        self.keep_columns = None if keep is None else keep[start:stop].unbind(0)


def _round_sub_block(
    block: _Block,
    sub: int,
    sub_end: int,
    column_scales: Sequence[tuple[torch.Tensor, Any]],
    round_column: Callable[..., torch.Tensor],
) -> None:
    """Round the block's columns ``sub:sub_end`` one at a time, each with its ``(scale, zero)``
    from ``column_scales``, keeping the raw rounding errors; each column's error reaches the
    rest of the sub-block at once (rank 1 per problem)."""
    work_columns, quantized_columns = block.work_columns, block.quantized_columns
    err_columns, problem_err_columns = block.err_columns, block.problem_err_columns
    keep_columns = block.keep_columns
    diagonal = block.hinv_diag_values
    # each column's error reaches the whole sub-block through its Hessian row with zeros up to
    # its own position: the rows already quantized (and its own) get exact zeros added, so one
    # view serves every column
    targets = [block.work[sub:sub_end, r] for r in block.rows]
    feedback = [h[sub:sub_end, sub:sub_end].triu(1).unbind(0) for h in block.hinv]
    each_problem = range(len(targets))
    for i, (s, zf) in zip(range(sub, sub_end), column_scales, strict=True):
        column = work_columns[i]
        q = round_column(column, s, zf, out=quantized_columns[i])
        if keep_columns is not None:  # pruned positions become zero (an OBS step too)
            q.mul_(keep_columns[i])
        # the raw rounding error; scaled by 1 / [H^-1]_ii once per sub-block (next step)
        torch.sub(column, q, out=err_columns[i])
        if i + 1 < sub_end:  # this column's error to the rest of its sub-block
            for p in each_problem:
                targets[p].addr_(
                    feedback[p][i - sub], problem_err_columns[p][i], alpha=-1.0 / diagonal[p][i]
                )


def _feed_sub_block_error(block: _Block, sub: int, sub_end: int) -> None:
    """Scale the sub-block's errors by ``1 / [H^-1]_ii`` and feed them to the rest of the
    block: one matrix product per problem."""
    for rows, diag, h in zip(block.rows, block.hinv_diag, block.hinv, strict=True):
        mine = block.err[sub:sub_end, rows]
        mine.div_(diag[sub:sub_end])
        if sub_end < block.width:
            block.work[sub_end:, rows].addmm_(h[sub:sub_end, sub_end:].t(), mine, alpha=-1.0)


def _feed_block_error(wt: torch.Tensor, problems: list[_Problem], block: _Block) -> None:
    """The block's errors to every later column (GPTQ's lazy batch update): one matrix product
    per problem."""
    start, stop = block.start, block.stop
    if stop == wt.shape[0]:
        return
    for problem in problems:
        assert problem.hinv is not None
        wt[stop:, problem.rows].addmm_(
            problem.hinv[start:stop, stop:].t(), block.err[:, problem.rows], alpha=-1.0
        )


class _ScaleLookup(Protocol):
    """Where the column loop finds each position's scale and zero point."""

    def start_block(self, block: _Block) -> None:
        """The loop enters ``block``."""

    def of_positions(self, first: int, last: int) -> Sequence[tuple[torch.Tensor, Any]]:
        """``(scale, zero)`` of positions ``first:last``, one sub-block of the current block:
        ``(rows,)`` tensors, the zero point in the buffer's dtype (or unused, see
        ``_column_rounder``)."""
        ...


def _scale_lookup(
    wt: torch.Tensor,
    problems: list[_Problem],
    args: QuantizationArgs,
    group_size: int,
    keep: torch.Tensor | None = None,
) -> _ScaleLookup:
    """The lookup for these problems: running group scales (from the kept positions only when
    ``keep`` is given), or tables of the fixed ones (set while pruned positions were still
    zero)."""
    if problems[0].col_group is None:  # no scales fixed up front
        return _RunningGroupScales(wt, problems, args, group_size, keep)
    # symmetric integer grids round without their zero point (all zeros): not gathered
    zero_free = args.symmetric and args.type == QuantizationType.INT
    tables: list[tuple[torch.Tensor, torch.Tensor]] = []
    for problem in problems:
        assert problem.scale is not None and problem.zero is not None
        tables.append((problem.scale.t().contiguous(), problem.zero.t().to(wt.dtype).contiguous()))
        if zero_free and tables[-1][1].any():
            raise AssertionError("a symmetric grid with a non-zero zero point")
    col_groups = [p.col_group for p in problems]
    if all(torch.equal(g, col_groups[0]) for g in col_groups[1:]):  # type: ignore[arg-type]
        return _SharedScaleTable(tables, col_groups[0].tolist())  # type: ignore[union-attr]
    return _GatheredScales(tables, problems, zero_free)


class _SharedScaleTable:
    """Fixed scales, every problem mapping positions to groups alike (no reordering, or one
    problem): a position's scales are one row of the joint ``(groups, rows)`` table."""

    def __init__(
        self, tables: list[tuple[torch.Tensor, torch.Tensor]], position_group: list[int]
    ) -> None:
        scale_rows = torch.cat([scale for scale, _ in tables], dim=1).unbind(0)
        zero_rows = torch.cat([zero for _, zero in tables], dim=1).unbind(0)
        self._group_rows = list(zip(scale_rows, zero_rows, strict=True))
        self._position_group = position_group

    def start_block(self, block: _Block) -> None:
        pass

    def of_positions(self, first: int, last: int) -> Sequence[tuple[torch.Tensor, Any]]:
        return [self._group_rows[g] for g in self._position_group[first:last]]


class _GatheredScales:
    """Fixed scales, the problems ordered differently: each block gathers its positions'
    scales from every problem's ``(groups, rows)`` table once."""

    def __init__(
        self,
        tables: list[tuple[torch.Tensor, torch.Tensor]],
        problems: list[_Problem],
        zero_free: bool,
    ) -> None:
        self._tables = tables
        self._problems = problems
        self._zero_free = zero_free
        self._start = 0
        self._block_scales: list[tuple[torch.Tensor, torch.Tensor]] = []

    def start_block(self, block: _Block) -> None:
        block_scale = torch.empty_like(block.work)
        block_zero = block_scale if self._zero_free else torch.empty_like(block.work)  # unread
        for problem, (scale_table, zero_table) in zip(self._problems, self._tables, strict=True):
            assert problem.col_group is not None
            where = problem.col_group[block.start : block.stop]
            block_scale[:, problem.rows] = scale_table.index_select(0, where)
            if not self._zero_free:
                block_zero[:, problem.rows] = zero_table.index_select(0, where)
        self._start = block.start
        self._block_scales = list(zip(block_scale.unbind(0), block_zero.unbind(0), strict=True))

    def of_positions(self, first: int, last: int) -> Sequence[tuple[torch.Tensor, Any]]:
        return self._block_scales[first - self._start : last - self._start]


class _RunningGroupScales:
    """Group scales not fixed up front: each group's come from min-max of its current
    (error-updated) columns when the loop reaches its first position, for every problem at
    once; ``scale`` and ``zero`` (``(rows, groups)``) collect them."""

    def __init__(
        self,
        wt: torch.Tensor,
        problems: list[_Problem],
        args: QuantizationArgs,
        group_size: int,
        keep: torch.Tensor | None = None,
    ) -> None:
        columns, rows = wt.shape
        self._problems = problems
        self.scale = torch.empty(rows, columns // group_size, device=wt.device)
        self.zero = torch.empty(rows, columns // group_size, device=wt.device, dtype=args.zp_dtype)
        self._args = args
        self._group_size = group_size
        self._wt = wt
        self._keep = keep
        self._block: _Block | None = None
        self._current: tuple[torch.Tensor, torch.Tensor] | None = None

    def start_block(self, block: _Block) -> None:
        self._block = block

    def of_positions(self, first: int, last: int) -> Sequence[tuple[torch.Tensor, Any]]:
        # a sub-block never straddles a group start: all its positions are in one group
        if first % self._group_size == 0:  # a group starts: scale its current columns
            self._current = self._scale_group_from(first)
        assert self._current is not None
        return [self._current] * (last - first)

    def _scale_group_from(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        block, group_size = self._block, self._group_size
        assert block is not None
        i = first - block.start
        # the group's columns in this block (error-updated so far), then those after it
        beyond = self._wt[block.stop : first + group_size]
        if beyond.shape[0]:
            # a group that runs past the block: the errors of the block's columns quantized
            # so far reach those columns only at the block's end, so they are added here
            # (the scale is the one a column-by-column loop would find, whatever the block
            # size); the errors are final and scaled, sub-blocks never straddle a group start
            beyond = beyond.clone()
            for problem in self._problems:
                assert problem.hinv is not None
                beyond[:, problem.rows].addmm_(
                    problem.hinv[block.start : first, block.stop : first + group_size].t(),
                    block.err[:i, problem.rows],
                    alpha=-1.0,
                )
        current = torch.cat([block.work[i : i + group_size], beyond])
        if self._keep is not None:
            # pruned positions hold compensation they will give back: the scale is the kept
            # weights' (zero is always on the grid, so a zero in their place changes nothing)
            current.mul_(self._keep[first : first + group_size])
        scale, zero = _qparams(current.t(), self._args)
        g = first // group_size
        self.scale[:, g], self.zero[:, g] = scale, zero
        return scale, zero.to(block.work.dtype)
