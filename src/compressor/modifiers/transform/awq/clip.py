"""AWQ's weight clipping search (Lin et al. 2024, arXiv:2306.00978; AutoAWQ's ``apply_clip``),
as pure functions: each quantization chunk's range shrunk by the factor whose quantized weights
change the layer's outputs on the calibration inputs the least.

The output error of a weight change ``D`` on inputs ``X`` is ``D (X^T X) D^T`` per row, so
the search needs only the inputs' Gram matrix ``X^T X`` (accumulated over every calibration
token, in ``columns x columns`` memory), never the tokens themselves. With channel scales the
chunk is a whole row and the error is exact; with group scales each group is searched on its
own block of the Gram matrix (the cross terms between groups are left out, as AutoAWQ does).
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
)

from compressor.modifiers.quantization.fake_quant import fake_quantize_weight
from compressor.modifiers.quantization.observers import weight_range

__all__ = ["CLIP_SHRINKS", "clip_problem", "clip_weight", "clipped_output_errors"]

CLIP_SHRINKS = tuple(1.0 - step / 20 for step in range(10))
"""The range factors searched (1 down to 0.55, AutoAWQ's 20-point grid over half the range)."""


def clip_problem(args: QuantizationArgs) -> str | None:
    """Why weights quantized with ``args`` cannot be clipped here, or None when they can
    (integer weights with channel or group scales)."""
    if args.type != QuantizationType.INT:
        return f"{args.type} weights (clipping searches integer grids)"
    if args.strategy not in (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP):
        return f"{args.strategy} scales (clipping searches channel or group ranges)"
    return None


def clipped_output_errors(delta: torch.Tensor, gram: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(rows, columns / chunk)``: each chunk's output error ``d G_c d^T`` for a weight change
    ``delta``, where ``G_c`` is the chunk's diagonal block of ``gram``.

    :param delta: ``(rows, columns)`` weight change
    :param gram: ``(columns, columns)`` ``X^T X`` of the layer's inputs
    :param chunk: columns per chunk (the row width for channel scales)
    """
    rows, columns = delta.shape
    if chunk == columns:
        return ((delta @ gram) * delta).sum(dim=1, keepdim=True)
    groups = columns // chunk
    blocks = torch.stack([gram[g * chunk : (g + 1) * chunk, g * chunk : (g + 1) * chunk]
                          for g in range(groups)])  # fmt: skip
    d = delta.reshape(rows, groups, chunk)
    return torch.einsum("rgi,gij,rgj->rg", d, blocks, d)


@torch.no_grad()
def clip_weight(
    weight: torch.Tensor, gram: torch.Tensor, args: QuantizationArgs, where: str
) -> tuple[torch.Tensor, float, float]:
    """The weight with each chunk clamped to ``[f lo, f hi]`` (its range shrunk by the factor
    ``f`` of ``CLIP_SHRINKS`` that quantizes with the least output error on the inputs whose
    Gram matrix is ``gram``), and the summed output errors of the quantized weight before and
    after. ``f = 1`` is searched, so no chunk gets worse than rounding its full range.

    :param weight: ``(rows, columns)``
    :param gram: ``(columns, columns)`` ``X^T X`` of the calibration inputs
    :param args: the weight's quantization (see ``clip_problem``)
    :param where: the layer's name, for errors
    :raises ValueError: weights ``clip_problem`` refuses, or a Gram matrix of another width
    """
    problem = clip_problem(args)
    if problem is not None:
        raise ValueError(f"{where}: cannot clip {problem}")
    if gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"{where}: Gram matrix {tuple(gram.shape)} does not match the weight's "
            f"{weight.shape[1]} columns"
        )
    w = weight.detach().float()
    g = gram.to(w.device, torch.float32)
    lo, hi = weight_range(w, args)
    chunk = w.shape[1] // lo.shape[1]
    best_error: torch.Tensor | None = None
    best_factor = torch.ones_like(lo)
    first = 0.0
    for factor in CLIP_SHRINKS:
        clamped = _clamped(w, lo * factor, hi * factor, chunk)
        error = clipped_output_errors(
            fake_quantize_weight(clamped, args, where=where) - w, g, chunk
        )
        if best_error is None:
            best_error, first = error, float(error.sum())
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_factor = torch.where(better, torch.full_like(best_factor, factor), best_factor)
    assert best_error is not None
    clipped = _clamped(w, lo * best_factor, hi * best_factor, chunk)
    return clipped.to(weight.dtype), first, float(best_error.sum())


def _clamped(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.minimum(
        torch.maximum(w, lo.repeat_interleave(chunk, dim=1)), hi.repeat_interleave(chunk, dim=1)
    )
