"""Writing int-quantized weights in compressed-tensors' ``pack-quantized`` layout in one pass
each, and counting on the way the zeros of the weights they stand for.

compressed-tensors' own compressor (``PackedQuantizationCompressor``) quantizes a weight with
a chain of fresh tensors (divide, clamp, round, cast), then packs the codes bit by bit with a
scatter into int32 words. For the layouts that keep whole codes in bytes (4 bits: two codes a
byte; 8 bits: one), packing is a byte view, and the quantization can run in place on one
buffer. The result is the same tensors, bit for bit (the tests compare them with
compressed-tensors' on every supported case); everything else is left to compressed-tensors.

The zeros of a weight as dequantized, ``(code - zero_point) * scale``, are the codes equal to
their zero point (and every code of a zero scale): they are counted from the codes, so the
checkpoint's ``sparsity_config`` needs no second quantization and no decompressed model.
"""

from __future__ import annotations

import sys

import torch
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.utils import calculate_range, is_module_quantized
from compressed_tensors.utils import get_direct_state_dict, replace_direct_state_dict

from compressor.checkpoint.sparsity import WeightZeros, weight_zeros

__all__ = ["int_codes", "pack_codes", "pack_quantized_modules"]

# bits whose codes fill whole bytes of a little-endian int32 word in compressed-tensors'
# dense packing (code i at bit i * num_bits): 4 bits two a byte (low nibble first), 8 bits one
_BYTE_ALIGNED_BITS = (4, 8)
_STRATEGIES = (
    QuantizationStrategy.TENSOR,
    QuantizationStrategy.CHANNEL,
    QuantizationStrategy.GROUP,
)
# the strategies whose asymmetric zero points compressed-tensors stores packed
_PACKED_ZERO_POINTS = (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL)


@torch.no_grad()
def int_codes(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
) -> torch.Tensor:
    """The int8 codes of a 2-D ``weight``: ``round(clamp(weight / scale + zero_point))``, the
    same operations in the same order (so the same values) as compressed-tensors' quantize,
    on one buffer.

    :param weight: ``(rows, columns)``
    :param scale: one per tensor, per row (``(rows, 1)``) or per group (``(rows, groups)``)
    :param zero_point: shaped as ``scale``, or None (symmetric)
    :param args: the weights' quantization (int; tensor, channel or group strategy)
    :return: int8 codes shaped as ``weight``
    """
    if args.strategy == QuantizationStrategy.GROUP:
        assert args.group_size is not None and weight.shape[-1] % args.group_size == 0
        grouped = weight.unflatten(-1, (weight.shape[-1] // args.group_size, args.group_size))
        while scale.ndim < 2:
            scale = scale.unsqueeze(1)
            zero_point = zero_point.unsqueeze(1) if zero_point is not None else None
        scale = scale.unsqueeze(-1)
        zero_point = zero_point.unsqueeze(-1) if zero_point is not None else None
    else:
        grouped = weight
    scaled = grouped / scale
    if zero_point is not None:
        scaled += zero_point.to(weight.dtype)
    q_min, q_max = calculate_range(args, str(weight.device))
    scaled.clamp_(q_min, q_max)
    scaled.round_()
    return scaled.to(torch.int8).reshape(weight.shape)


@torch.no_grad()
def pack_codes(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Pack the int8 ``codes`` of a 2-D weight along its rows into int32 words, laid out as
    compressed-tensors' ``pack_to_int32`` lays them (code i of a row at bit ``i * num_bits``
    of the row's words, offset by ``2**(num_bits-1)`` to be unsigned, rows padded with zero
    bits), for 4 or 8 bits on a little-endian machine.

    :param codes: ``(rows, columns)`` int8
    :param num_bits: 4 or 8
    :return: ``(rows, ceil(columns * num_bits / 32))`` int32
    """
    if num_bits not in _BYTE_ALIGNED_BITS or sys.byteorder != "little":
        raise ValueError(f"pack_codes packs 4 or 8 bits on a little-endian machine, not {num_bits}")
    rows, columns = codes.shape
    per_word = 32 // num_bits
    words = -(-columns // per_word)
    # int8 + offset wraps to the unsigned code in uint8 arithmetic
    unsigned = codes.view(torch.uint8) + (1 << (num_bits - 1))
    if columns % per_word:  # the last word of each row is filled with zero bits
        padded = torch.zeros(rows, words * per_word, dtype=torch.uint8, device=codes.device)
        padded[:, :columns] = unsigned
        unsigned = padded
    if num_bits == 4:
        pairs = unsigned.view(rows, -1, 2)
        unsigned = pairs[..., 0] | (pairs[..., 1] << 4)
    return unsigned.view(torch.int32).reshape(rows, words)


def _fast_path(module: torch.nn.Module, scheme: QuantizationScheme) -> bool:
    """Whether ``module``'s weight is one ``pack_codes`` writes: int, 4 or 8 bits, per
    tensor / channel / group (no global scale), 2-D, in memory (not offloaded)."""
    weights = scheme.weights
    weight = module._parameters.get("weight") if type(module._parameters) is dict else None
    return (
        weights is not None
        and weights.type == QuantizationType.INT
        and weights.num_bits in _BYTE_ALIGNED_BITS
        and weights.strategy in _STRATEGIES
        and sys.byteorder == "little"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.device.type != "meta"
        and isinstance(module._parameters.get("weight_scale"), torch.Tensor)
        and "weight_global_scale" not in module._parameters
    )


@torch.no_grad()
def _pack_module(module: torch.nn.Module, scheme: QuantizationScheme) -> WeightZeros:
    """Compress ``module`` in place as compressed-tensors' pack-quantized compressor does
    (``weight`` replaced by ``weight_packed`` and ``weight_shape``; symmetric zero points
    dropped; status ``COMPRESSED``) and return the zeros of its dequantized weight."""
    weights = scheme.weights
    assert weights is not None
    state = get_direct_state_dict(module)
    weight = state.pop("weight")
    scale = state["weight_scale"]
    zero_point = state.get("weight_zero_point")
    codes = int_codes(weight, scale, zero_point, weights)
    zeros = weight_zeros(_dequantized_zeros(codes, scale, zero_point, weights))
    state["weight_packed"] = pack_codes(codes, weights.num_bits)
    state["weight_shape"] = torch.tensor(weight.shape)
    if not weights.symmetric and weights.strategy in _PACKED_ZERO_POINTS:
        assert zero_point is not None  # small: compressed-tensors' own packing
        packed_zp = pack_to_int32(zero_point, weights.num_bits, packed_dim=0)
        state["weight_zero_point"] = packed_zp.contiguous()
    for base, args in (
        ("input", scheme.input_activations),
        ("weight", scheme.weights),
        ("output", scheme.output_activations),
    ):
        if args is not None and args.symmetric:
            state.pop(f"{base}_zero_point", None)
    replace_direct_state_dict(module, state)
    module.quantization_status = QuantizationStatus.COMPRESSED
    return zeros


def _dequantized_zeros(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
) -> torch.Tensor:
    """Where ``(codes - zero_point) * scale`` is zero: the code is its zero point (under a
    finite scale: zero times infinity is not zero) or the scale is zero (a nonzero whole
    number times a nonzero scale is never zero, not even a subnormal one)."""
    rows, columns = codes.shape
    if args.strategy == QuantizationStrategy.GROUP:
        assert args.group_size is not None
        codes = codes.view(rows, columns // args.group_size, args.group_size)
        per_code = (rows, -1, 1)
    else:
        per_code = (-1, 1) if scale.numel() > 1 else (1, 1)
    zero = codes == (0 if zero_point is None else zero_point.to(torch.int8).reshape(per_code))
    finite = torch.isfinite(scale)
    if not bool(finite.all()):
        zero &= finite.reshape(per_code)
    zero_scale = scale == 0
    if bool(zero_scale.any()):
        zero |= zero_scale.reshape(per_code)
    return zero.reshape(rows, columns)


def pack_quantized_modules(
    model: torch.nn.Module, force_format: CompressionFormat | None = None
) -> dict[str, WeightZeros]:
    """Compress the modules of ``model`` whose format is ``pack-quantized`` and whose weights
    ``pack_codes`` writes (see ``_fast_path``), in place, as compressed-tensors would; the
    others are left for compressed-tensors' ``compress_model(skip_compressed=True)``.

    :param model: a quantized model about to be saved
    :param force_format: the format every quantized module is written in (compressed-tensors'
        ``force_compression_format``), else each module's own
    :return: the zeros of each compressed module's dequantized weight, by module name
    """
    zeros: dict[str, WeightZeros] = {}
    for name, module in model.named_modules(remove_duplicate=True):
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(scheme, QuantizationScheme) or not is_module_quantized(module):
            continue
        if getattr(module, "quantization_status", None) == QuantizationStatus.COMPRESSED:
            continue
        scheme.format = CompressionFormat(
            force_format or scheme.format or infer_module_format(type(module), scheme)
        )
        if scheme.format == CompressionFormat.pack_quantized and _fast_path(module, scheme):
            zeros[name] = _pack_module(module, scheme)
    return zeros
