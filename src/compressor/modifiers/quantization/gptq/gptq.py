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
from typing import Literal

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
    "round_to_nearest",
]

ActOrder = Literal["static", "group"]
"""Activation ordering: ``static`` quantizes columns in order of decreasing Hessian diagonal with
scales fixed up front on the contiguous groups (same checkpoint format as no reordering);
``group`` also forms the groups in that order, with a ``g_idx`` mapping columns to groups."""

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
    :param g_idx: for ``actorder="group"``, the group index of every input column; else None
    :param loss: GPTQ's estimate of the added squared error, ``sum (w - q)^2 / [H^-1]_jj / 2``
    :param dampening_frac: the dampening that made the Hessian invertible (may exceed the
        requested one)
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    g_idx: torch.Tensor | None
    loss: float
    dampening_frac: float


@contextlib.contextmanager
def _few_threads(tensor: torch.Tensor) -> Iterator[None]:
    """Run GPTQ's column loop on one CPU thread.

    The loop is thousands of small tensor operations; on CPU, spreading each over OpenMP
    threads costs more in synchronisation than it saves, and on a busy machine every barrier
    waits for a descheduled thread (measured: 2.2 s instead of 6.5 s for a 576x1536 weight
    under load). The previous thread count is restored afterwards.
    """
    previous = torch.get_num_threads()
    if tensor.device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _qparams(columns: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point of each row of ``columns`` (``(rows, k)``)."""
    return calculate_qparams(columns.amin(dim=1), columns.amax(dim=1), args)


def _column_rounder(args: QuantizationArgs) -> Callable[..., torch.Tensor]:
    """A function ``(column, scale, zero, out=None) -> dequantized column`` for 1-D
    ``(rows,)`` tensors, the zero point given in the column's floating dtype.

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
    group's scale is fixed up front so the groups may stay contiguous in the original order.

    :param weight: the Linear's weight (not modified); or several weights with the same
        columns and one Hessian (q/k/v projections), quantized as one problem with their rows
        stacked (the result holds them in that order), without a stacked copy of them
    :param hessian: ``(columns, columns)`` Hessian of the Linear's inputs
    :param args: compressed-tensors quantization args (int or float; tensor, channel or group)
    :param block_size: columns per lazy-update block
    :param dampening_frac: fraction of the mean Hessian diagonal added to its diagonal
    :param actorder: None, ``"static"`` or ``"group"`` (see ``ActOrder``)
    :param overwrite_hessian: the caller no longer needs ``hessian``: it may be changed in
        place instead of copied (saves two matrices of memory on the largest layers)
    """
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    if not weights:
        raise ValueError("no weight to quantize")
    for part in weights:
        _check(part, args, block_size)
    columns = weights[0].shape[1]
    if any(part.shape[1] != columns for part in weights):
        shapes = [tuple(part.shape) for part in weights]
        raise ValueError(f"stacked weights must have the same input columns, got {shapes}")
    rows = sum(part.shape[0] for part in weights)
    if hessian.shape != (columns, columns):
        raise ValueError(
            f"the Hessian is {tuple(hessian.shape)}, the weight has {columns} input columns"
        )
    if actorder not in (None, "static", "group"):
        raise ValueError(f"actorder must be None, 'static' or 'group'; got {actorder!r}")
    grouped = args.strategy == QuantizationStrategy.GROUP
    group_size = args.group_size if grouped else columns
    if actorder == "group" and not grouped:
        actorder = "static"  # without groups, the two orders are the same

    # Work on the transpose, built in one copy: each input column is then one contiguous row,
    # which makes the thousands of per-column operations below several times cheaper.
    device = weights[0].device
    wt = torch.empty(columns, rows, dtype=torch.float32, device=device)
    first = 0
    for part in weights:
        wt[:, first : first + part.shape[0]].copy_(part.detach().t())
        first += part.shape[0]
    h = hessian.detach().to(device=device, dtype=torch.float32)
    if h.data_ptr() == hessian.data_ptr() and not overwrite_hessian:
        h = h.clone()  # the caller's Hessian stays as it was
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    wt[dead] = 0.0

    # scales that are fixed before any column is quantized
    fixed_scale = fixed_zero = None
    if args.strategy == QuantizationStrategy.TENSOR:
        fixed_scale, fixed_zero = calculate_qparams(wt.amin(), wt.amax(), args)
        fixed_scale, fixed_zero = fixed_scale.reshape(1, 1), fixed_zero.reshape(1, 1)
    elif not grouped or actorder == "static":
        # per row and group of columns: (groups, group_size, rows) reduced over the group
        by_group = wt.view(columns // group_size, group_size, rows)
        low, high = by_group.amin(dim=1).t(), by_group.amax(dim=1).t()  # (rows, groups)
        fixed_scale, fixed_zero = calculate_qparams(low.reshape(-1), high.reshape(-1), args)
        fixed_scale = fixed_scale.reshape(rows, -1)
        fixed_zero = fixed_zero.reshape(rows, -1)

    perm = None
    if actorder is not None:
        perm = torch.argsort(h.diagonal(), descending=True)
        wt = wt[perm]
        # h is ours (a copy, or the caller's given up): permuted in place with one gather, so
        # no second Hessian-sized matrix outlives this line (the widest are tens of MB)
        h.copy_(h[perm.unsqueeze(1), perm])
    # the inverse's factor takes h's memory
    hinv, used_frac = inverse_hessian_cholesky(h, dampening_frac, overwrite=True)
    del h

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
    # fixed scales: each column's (scale, zero point) row looked up once per group
    fixed_columns: list[tuple[torch.Tensor, torch.Tensor]] = []
    col_group: list[int] = []
    if fixed_scale is not None:
        assert fixed_zero is not None
        fixed_columns = [
            (fixed_scale[:, g], fixed_zero[:, g].to(wt.dtype)) for g in range(fixed_scale.shape[1])
        ]
        order = perm.tolist() if perm is not None else range(columns)
        col_group = [0 if fixed_scale.shape[1] == 1 else c // group_size for c in order]

    with _few_threads(wt):
        for start in range(0, columns, block_size):
            stop = min(start + block_size, columns)
            block = wt[start:stop].clone()  # (columns in block, rows)
            block_err = torch.empty_like(block)
            block_q = torch.empty_like(block)
            block_hinv = hinv[start:stop, start:stop]
            block_diag = block_hinv.diagonal().unsqueeze(1)
            diagonal = block_diag.squeeze(1).tolist()
            width = stop - start
            # per-column views made once per block: indexing costs as much as a small kernel
            rows_w, rows_q, rows_e = block.unbind(0), block_q.unbind(0), block_err.unbind(0)
            for sub in range(0, width, inner):
                sub_end = min(sub + inner, width)
                # each column's error reaches the whole sub-block through its Hessian row with
                # zeros up to its own position: the rows already quantized (and its own) get
                # exact zeros added, so one view serves every column
                target = block[sub:sub_end]
                feedback = block_hinv[sub:sub_end, sub:sub_end].triu(1).unbind(0)
                for i in range(sub, sub_end):
                    col = start + i  # position in the (possibly permuted) order
                    if fixed_scale is not None:
                        s, zf = fixed_columns[col_group[col]]
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
                    diff = torch.sub(column, q, out=rows_e[i])
                    if i + 1 < sub_end:  # this column's error to the rest of its sub-block
                        target.addr_(feedback[i - sub], diff, alpha=-1.0 / diagonal[i])
                block_err[sub:sub_end].div_(block_diag[sub:sub_end])
                if sub_end < width:  # the sub-block's errors to the rest of the block
                    block[sub_end:].addmm_(
                        block_hinv[sub:sub_end, sub_end:].t(), block_err[sub:sub_end], alpha=-1.0
                    )
            wt[start:stop] = block_q
            # each column's loss is (w - q)^2 / d^2 / 2 = err^2 / 2
            losses += block_err.square().sum(dim=0) / 2
            wt[stop:].addmm_(hinv[start:stop, stop:].t(), block_err, alpha=-1.0)
    quantized = wt.t()

    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        quantized = quantized[:, inverse]
        if actorder == "group":
            g_idx = (inverse // group_size).to(torch.int32)
    if fixed_scale is not None:
        scale, zero = fixed_scale, fixed_zero
    if args.strategy == QuantizationStrategy.TENSOR:
        scale, zero = scale.reshape(1), zero.reshape(1)
    return GPTQResult(
        weight=quantized.to(weights[0].dtype),
        scale=scale,
        zero_point=zero.to(args.zp_dtype),
        g_idx=g_idx,
        loss=float(losses.sum()),
        dampening_frac=used_frac,
    )
