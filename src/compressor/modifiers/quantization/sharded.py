"""Weight scales of tensor-parallel (DTensor) weights: which are local to a rank's slice, which
need a reduction over the ranks, and which the layout cannot honour.

``ColwiseParallel`` splits a Linear's output rows over the ranks (``Shard(0)``),
``RowwiseParallel`` its input columns (``Shard(1)``). A scale that spans only whole rows of a
rank's slice is computed there alone: per output channel under ``ColwiseParallel``, groups of
columns under ``RowwiseParallel`` whose boundaries fall on the shard boundaries. A scale that
spans the split dimension takes the minimum and maximum of every rank's part (``reduce``), so
every rank uses the scale one process computes from the whole weight: per output channel
under ``RowwiseParallel``, and per tensor under either. A group or block that straddles two
ranks' slices, and ternary / binary weights (their alpha is a mean over a row or the tensor)
across the split dimension, are refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy
from torch.distributed.tensor import DTensor

from compressor.utils.sharding import ShardLayout, layout_of

__all__ = [
    "Reduce",
    "activation_reduction",
    "check_sharded_scheme",
    "on_local_slice",
    "scale_extent",
    "shard_reduction",
]

#: reduces a statistic of a rank's slice over the ranks, in place: ``reduce(tensor, op)``
Reduce = Callable[[torch.Tensor, str], torch.Tensor]

_SUPPORTED = "tensor, channel, group or block"


def on_local_slice(value: DTensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``compute`` on this rank's slice of ``value``, put back as a DTensor of the same
    layout; differentiable both ways, so gradients reach ``value`` as they would reach an
    ordinary tensor."""
    local = compute(value.to_local())
    return DTensor.from_local(
        local,
        value.device_mesh,
        value.placements,
        run_check=False,
        shape=value.shape,
        stride=value.stride(),
    )


def scale_extent(
    args: QuantizationArgs, where: str, levels: str | None = None
) -> tuple[int | None, int | None]:
    """How many rows and columns of the weight one scale covers (None: the whole dimension).

    :param levels: ``ternary`` / ``binary`` weights (one alpha per row, or per tensor)
    :raises ValueError: a strategy with no weight scale layout here (``tensor_group``, ...)
    """
    strategy = QuantizationStrategy(args.strategy)
    if levels is not None:
        return (None, None) if strategy == QuantizationStrategy.TENSOR else (1, None)
    if strategy == QuantizationStrategy.TENSOR:
        return None, None
    if strategy == QuantizationStrategy.CHANNEL:
        return 1, None
    if strategy == QuantizationStrategy.GROUP:
        return 1, args.group_size
    if strategy == QuantizationStrategy.BLOCK:
        rows, cols = args.block_structure
        return rows, cols
    raise ValueError(
        f"{where}: weight strategy {strategy.value!r} is not supported on a tensor-parallel "
        f"(DTensor) weight; use {_SUPPORTED}"
    )


def shard_reduction(
    args: QuantizationArgs, weight: torch.Tensor, where: str, levels: str | None = None
) -> Reduce | None:
    """How a rank computes ``weight``'s scales from its slice: None when they are local (or
    the weight is not sharded), else the reduction over the ranks that makes them whole.

    :param where: the module's name, for errors
    :param levels: ``ternary`` / ``binary`` weights
    :raises ValueError: naming the module and the reason, when a group or block straddles
        two ranks' slices, or a mean over the split dimension would be needed
    """
    layout = layout_of(weight, where)
    if layout is None or layout.dim is None:
        return None
    extent = scale_extent(args, where, levels)[layout.dim]
    split = (
        "output rows (ColwiseParallel)" if layout.dim == 0 else "input columns (RowwiseParallel)"
    )
    if extent is None:
        if levels is not None:
            raise ValueError(
                f"{where}: {levels} weights take the mean magnitude of each "
                f"{'tensor' if QuantizationStrategy(args.strategy) == QuantizationStrategy.TENSOR else 'row'}"
                f", a whole-tensor statistic across the {split} split over the ranks, which is not "
                "reduced; use integer weights, or shard this module along its output rows"
            )
        return _reducer(layout)
    _check_aligned(layout, extent, args, where, split)
    return None


def check_sharded_scheme(
    args: QuantizationArgs, weight: torch.Tensor, where: str, levels: str | None = None
) -> None:
    """Refuse, before training, a weight scheme ``weight``'s shard layout cannot honour
    (``shard_reduction``'s errors); nothing for an ordinary tensor."""
    shard_reduction(args, weight, where, levels)


def activation_reduction(
    args: QuantizationArgs, value: torch.Tensor, where: str, fused: bool
) -> Reduce | None:
    """How a rank computes the activation scales of its slice of a DTensor activation (the
    input of a RowwiseParallel Linear is split along its features): None when they are local
    (a replicated input, or per-token scales of an input split along the tokens), else the
    reduction over the ranks.

    :param fused: ``args`` take the fused symmetric-integer path, whose per-token peak can be
        reduced (compressed-tensors' dynamic scales cannot)
    :raises ValueError: naming the module, for what the split cannot give
    """
    layout = layout_of(value, where)
    if layout is None or layout.dim is None:
        return None
    strategy = QuantizationStrategy(args.strategy)
    if strategy == QuantizationStrategy.TOKEN and layout.dim != value.dim() - 1:
        return None
    if strategy == QuantizationStrategy.TENSOR and (fused or not args.dynamic):
        return _reducer(layout)
    if strategy == QuantizationStrategy.TOKEN and fused:
        return _reducer(layout)
    raise ValueError(
        f"{where}: {'dynamic' if args.dynamic else 'static'} {strategy.value} activation "
        f"scales{'' if fused else ' (asymmetric or not integer)'} are not supported on an "
        f"activation split over the ranks along dimension {layout.dim}; use symmetric "
        "integer per-token or per-tensor activations"
    )


def _check_aligned(
    layout: ShardLayout, extent: int, args: QuantizationArgs, where: str, split: str
) -> None:
    if extent == 1:
        return
    width = layout.stop - layout.start
    if layout.start % extent == 0 and (width % extent == 0 or layout.stop == layout.size):
        return
    what = (
        f"group_size={args.group_size}"
        if QuantizationStrategy(args.strategy) == QuantizationStrategy.GROUP
        else f"block_structure={args.block_structure}"
    )
    raise ValueError(
        f"{where}: {what} straddles the shards of its weight, whose {split} are split over "
        f"the ranks as slices of {width} (this rank: {layout.start}-{layout.stop} of "
        f"{layout.size}); choose a size that divides {width}, or another tensor-parallel plan"
    )


def _reducer(layout: ShardLayout) -> Reduce:
    def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        # a rank whose slice holds NaN or inf passes inf on, so that every rank raises
        # together (one rank raising alone would leave the others waiting in the reduction)
        bad = float("-inf") if op == "min" else float("inf")
        tensor.masked_fill_(~torch.isfinite(tensor), bad)
        return layout.reduce_(tensor, op)  # type: ignore[arg-type]

    return reduce
