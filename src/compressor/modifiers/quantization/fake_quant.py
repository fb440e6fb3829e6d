"""Fake quantization for training: straight-through estimators around compressed-tensors.

compressed-tensors' ``fake_quantize`` runs under ``torch.no_grad``, so by itself it stops
gradients. ``straight_through`` keeps the quantized value in the forward and passes the
gradient unchanged to the full-precision tensor (Bengio et al., 2013,
https://arxiv.org/abs/1308.3432).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStrategy,
    QuantizationType,
    fake_quantize,
)
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
from torch.distributed.tensor import DTensor

from compressor.modifiers.quantization.observers import (
    RangeObserver,
    activation_range,
    qparams_from_range,
    weight_range,
)
from compressor.modifiers.quantization.sharded import (
    Reduce,
    activation_reduction,
    on_local_slice,
    shard_reduction,
)

__all__ = [
    "ActivationFakeQuantizer",
    "LowBitWeights",
    "WeightFakeQuantizer",
    "binarize",
    "is_per_tensor",
    "low_bit_weight",
    "ternarize",
    "expand_to_weight",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "fused_fake_quantize",
    "straight_through",
]


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward, identity gradient to ``x`` in the backward."""
    return x + (quantized - x).detach()


def _fast_path_dim(args: QuantizationArgs, role: str) -> int | None | bool:
    """Where the fused symmetric-integer fake quantizer reduces, or False when ``args`` need
    compressed-tensors' general path. ``None``: one scale for the whole tensor; ``-1``: one
    per row of a weight (channel) or per token of an activation (the last dimension)."""
    if (
        args.type != QuantizationType.INT
        or not args.symmetric
        or args.scale_dtype is not None
        or args.zp_dtype not in (None, torch.int8)
    ):
        return False
    if args.strategy == QuantizationStrategy.TENSOR:
        return None
    if (role == "weight" and args.strategy == QuantizationStrategy.CHANNEL) or (
        role == "activation" and args.strategy == QuantizationStrategy.TOKEN
    ):
        return -1
    return False


class _SymmetricIntFakeQuant(torch.autograd.Function):
    """Symmetric integer fake quantization with a straight-through gradient, fused.

    The same arithmetic as compressed-tensors (scale ``max|x| / (range / 2)``, epsilon for an
    all-zero row, ``x / scale`` clamped, rounded and rescaled; a test pins it bit for bit),
    in a few in-place operations and one autograd node whose backward passes the gradient
    through unchanged. Training runs two of these per Linear per step, so the general path's
    bookkeeping and the ``x + (q - x).detach()`` pair it needs for the gradient cost a
    sizeable share of a step.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        dim: int | None,
        low: float,
        high: float,
        where: str,
        reduce: Reduce | None = None,
    ) -> torch.Tensor:
        with torch.no_grad():
            magnitude = x.abs()
            peak = magnitude.amax() if dim is None else magnitude.amax(dim=dim, keepdim=True)
            del magnitude
            if reduce is not None:  # a slice of a tensor-parallel weight
                peak = reduce(peak.float(), "max").to(x.dtype)
            if not torch.isfinite(peak).all():
                raise ValueError(f"{where}: the range holds NaN or infinite values")
            scale = peak.float().div_((high - low) / 2)
            scale.masked_fill_(scale == 0, torch.finfo(scale.dtype).eps)
            scale = scale.to(x.dtype)
            out = x / scale
            out.clamp_(low, high).round_().mul_(scale)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return grad, None, None, None, None, None


def fused_fake_quantize(
    x: torch.Tensor,
    args: QuantizationArgs,
    role: str,
    where: str = "",
    reduce: Reduce | None = None,
) -> torch.Tensor | None:
    """Fake-quantize ``x`` with a straight-through gradient on the fused path, or return None
    when ``args`` need compressed-tensors' general one (see ``_fast_path_dim``).

    :param role: ``weight`` (a 2-D matrix) or ``activation`` (tokens on the last dimension)
    :param reduce: ``x`` is a rank's slice of a tensor-parallel weight whose scales span the
        split dimension: reduces their ranges over the ranks (``sharded.shard_reduction``)
    """
    dim = _fast_path_dim(args, role)
    if dim is False or (role == "weight" and x.dim() != 2):
        return None
    low, high = (-(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1)
    return _SymmetricIntFakeQuant.apply(x, dim, float(low), float(high), where, reduce)


def expand_to_weight(values: torch.Tensor, matrix_shape: torch.Size, args: QuantizationArgs):
    """Repeat per-group (or per-block) scales so that they broadcast over the weight matrix."""
    if args.strategy == QuantizationStrategy.GROUP:
        return values.repeat_interleave(args.group_size, dim=1)
    if args.strategy == QuantizationStrategy.BLOCK:
        rows, cols = args.block_structure
        full = values.repeat_interleave(rows, dim=0).repeat_interleave(cols, dim=1)
        return full[: matrix_shape[0], : matrix_shape[1]]
    return values  # tensor (1,) and channel (rows, 1) broadcast already


@torch.no_grad()
def fake_quantize_weight(
    weight: torch.Tensor,
    args: QuantizationArgs,
    stochastic: bool = False,
    where: str = "weight",
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """Quantize then dequantize a weight with scales from its current range.

    :param stochastic: round up with probability equal to the fractional part (int only),
        so that the rounding is unbiased (Gupta et al., 2015, https://arxiv.org/abs/1502.02551)
    :param reduce: ``weight`` is a rank's slice of a tensor-parallel weight: reduces its
        ranges over the ranks (``sharded.shard_reduction``)
    """
    matrix = weight.flatten(1) if weight.dim() > 2 else weight
    lo, hi = weight_range(matrix, args)
    if reduce is not None:
        lo, hi = reduce(lo, "min"), reduce(hi, "max")
    scale, zero_point = qparams_from_range(lo, hi, args, where)
    scale = scale.to(matrix.dtype)
    if stochastic:
        if args.type != QuantizationType.INT:
            raise ValueError("stochastic rounding is defined for int quantization only")
        step = expand_to_weight(scale, matrix.shape, args)
        matrix = matrix + (torch.rand_like(matrix) - 0.5) * step
    out = fake_quantize(matrix, scale, zero_point, args)
    return out.reshape(weight.shape).to(weight.dtype)


@torch.no_grad()
def fake_quantize_activation(
    x: torch.Tensor,
    args: QuantizationArgs,
    scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize then dequantize activations: dynamic args compute their scales from ``x``
    (per token, tensor or group), static ones use the given ``scale`` and ``zero_point``."""
    if args.dynamic:
        scale, zero_point = compute_dynamic_scales_and_zp(value=x, args=args, module=None)
    if scale is None:
        raise ValueError("static activation quantization needs a scale")
    return fake_quantize(x, scale.to(x.dtype), zero_point, args)


LowBitWeights = Literal["ternary", "binary"]


def _rows(weight: torch.Tensor, per_tensor: bool) -> torch.Tensor:
    """The weight as (groups, values): one group per output row, or one for the tensor."""
    if per_tensor:
        return weight.reshape(1, -1)
    return weight.flatten(1) if weight.dim() > 2 else weight


@torch.no_grad()
def ternarize(weight: torch.Tensor, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary weights per output row (or per tensor): ``alpha * {-1, 0, 1}``.

    Weights below ``0.7 * mean|w|`` become 0 and the rest ``+-alpha``, with ``alpha`` the
    mean magnitude of those kept (Li et al., 2016, "Ternary Weight Networks",
    https://arxiv.org/abs/1605.04711; DeepSpeed's XTC).

    :param per_tensor: one threshold and alpha for the whole tensor (DeepSpeed's
        ``quantize_groups: 1``) instead of one per output row
    :return: the ternary weight (same shape) and alpha, shaped (rows, 1) or (1, 1)
    """
    w = _rows(weight, per_tensor)
    magnitude = w.abs()
    keep = magnitude > 0.7 * magnitude.mean(dim=1, keepdim=True)
    count = keep.sum(dim=1, keepdim=True).clamp(min=1)
    alpha = (magnitude * keep).sum(dim=1, keepdim=True) / count
    return (torch.sign(w) * keep * alpha).reshape(weight.shape), alpha


@torch.no_grad()
def binarize(weight: torch.Tensor, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary weights per output row (or per tensor): ``alpha * sign(w)`` with
    ``alpha = mean|w|`` (Rastegari et al., 2016, "XNOR-Net", https://arxiv.org/abs/1603.05279);
    a weight of exactly 0 stays 0, as in DeepSpeed's XTC.

    :param per_tensor: one alpha for the whole tensor instead of one per output row
    :return: the binary weight (same shape) and alpha, shaped (rows, 1) or (1, 1)
    """
    w = _rows(weight, per_tensor)
    alpha = w.abs().mean(dim=1, keepdim=True)
    return (torch.sign(w) * alpha).reshape(weight.shape), alpha


def low_bit_weight(
    weight: torch.Tensor, levels: LowBitWeights, per_tensor: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ternarize`` or ``binarize`` (per output row, or per tensor)."""
    if levels == "ternary":
        return ternarize(weight, per_tensor)
    return binarize(weight, per_tensor)


def is_per_tensor(args: QuantizationArgs) -> bool:
    """Whether ``args`` give the whole weight one scale (strategy ``tensor``)."""
    return QuantizationStrategy(args.strategy) == QuantizationStrategy.TENSOR


class WeightFakeQuantizer(torch.nn.Module):
    """A parametrization that fake-quantizes a weight with a straight-through gradient.

    ``num_bits`` can be lowered during training (progressive bit reduction). With
    ``full_precision_share`` ``r`` above 0 the forward sees ``r * w + (1 - r) * quantized``
    (DeepSpeed's ``fp16_mixed_quantize``); the gradient still reaches ``w`` unchanged.

    :param args: the weight's quantization args
    :param stochastic: use stochastic rounding
    :param where: the module's name, for errors
    :param levels: ``ternary`` or ``binary`` weights instead of ``args``' integer grid
    """

    def __init__(
        self,
        args: QuantizationArgs,
        stochastic: bool = False,
        where: str = "",
        levels: LowBitWeights | None = None,
    ) -> None:
        super().__init__()
        self.args = args
        self.stochastic = stochastic
        self.where = where
        self.levels = levels
        self.full_precision_share = 0.0

    @property
    def num_bits(self) -> int:
        return self.args.num_bits

    @num_bits.setter
    def num_bits(self, bits: int) -> None:
        self.args = self.args.model_copy(update={"num_bits": bits})

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if isinstance(weight, DTensor):  # tensor parallelism: this rank's slice, reduced
            reduce = shard_reduction(self.args, weight, self.where, self.levels)
            return on_local_slice(weight, lambda local: self._quantize(local, reduce))
        return self._quantize(weight)

    def _quantize(self, weight: torch.Tensor, reduce: Reduce | None = None) -> torch.Tensor:
        if self.levels is None and not self.stochastic and self.full_precision_share <= 0.0:
            fused = fused_fake_quantize(weight, self.args, "weight", self.where, reduce)
            if fused is not None:
                return fused
        if self.levels is not None:  # a slice only when its rows are whole (shard_reduction)
            quantized, _ = low_bit_weight(weight, self.levels, is_per_tensor(self.args))
        else:
            quantized = fake_quantize_weight(weight, self.args, self.stochastic, self.where, reduce)
        share = self.full_precision_share
        if share > 0.0:
            quantized = share * weight.detach() + (1.0 - share) * quantized
        return straight_through(weight, quantized)


class ActivationFakeQuantizer:
    """Fake-quantizes activations with a straight-through gradient.

    Dynamic args compute their scales from each batch; static ones from ``observer``'s
    range, which each batch updates until ``frozen`` is set. While ``active`` is False the
    activations pass through untouched and nothing is observed.

    :param args: the activation's quantization args
    :param observer: the range observer (None for dynamic args)
    :param where: the module and role, for errors about NaN or inf
    """

    def __init__(self, args: QuantizationArgs, observer: RangeObserver | None, where: str) -> None:
        self.args = args
        self.observer = observer
        self.where = where
        self.frozen = False
        self.active = True

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return value
        if isinstance(value, DTensor):  # tensor parallelism: this rank's slice, reduced
            fused = _fast_path_dim(self.args, "activation") is not False
            reduce = activation_reduction(self.args, value, self.where, fused)
            return on_local_slice(value, lambda local: self._quantize(local, reduce))
        return self._quantize(value)

    def _quantize(self, value: torch.Tensor, reduce: Reduce | None = None) -> torch.Tensor:
        if self.observer is None:
            fused = fused_fake_quantize(value, self.args, "activation", self.where, reduce)
            if fused is not None:
                return fused
            return straight_through(value, fake_quantize_activation(value, self.args))
        if not self.frozen or self.observer.batches == 0:
            lo, hi = activation_range(value, self.args)
            if reduce is not None:
                lo, hi = reduce(lo, "min"), reduce(hi, "max")
            qparams_from_range(lo, hi, self.args, self.where)  # raises on NaN / inf
            self.observer.update(lo, hi)
        scale, zero_point = qparams_from_range(*self.observer.range, self.args, self.where)
        quantized = fake_quantize_activation(value, self.args, scale, zero_point)
        return straight_through(value, quantized)
