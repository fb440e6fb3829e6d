"""The quantized forward of a Linear during post-training calibration, computed faster.

compressed-tensors' quantized forward fake-quantizes the input and the weight on every call
through its general path (every strategy, fp8 and fp4 grids, global scales): a division, an
addition of the zero point, a clamp against bound tensors, a rounding, a subtraction and a
multiplication, each into a new tensor. On one CPU thread that costs about as much as the
matrix product it feeds (a 1024 x 1536 input: 27 ms against 29 ms for the product;
bench/results/2026-12-02-w8a8-speed.md). For integer grids with one scale per tensor or per
row (``tensor``, ``channel``), ``fake_quantize_int`` does the same operations in the same
order in one buffer, in place: the result is the same (a test pins it bit for bit against
compressed-tensors for each case, zeros' signs aside), in a tenth of the time. Other schemes, static outputs,
tensor-parallel (DTensor) or compressed modules keep compressed-tensors' own forward.

``CalibrationForwards`` puts this forward on the modules for the time of a calibration and
gives compressed-tensors' back after it, so what is saved and run later is unchanged. Nothing
is cached between calls: a weight or scale that a modifier changes (GPTQ, SmoothQuant's fold)
is read afresh by the next forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationStatus,
    QuantizationStrategy,
    QuantizationType,
)
from compressed_tensors.quantization.utils import calculate_range
from torch.distributed.tensor import DTensor

__all__ = ["CalibrationForwards", "fake_quantize_int", "fast_fake_quantizable"]

_ROWS_OR_TENSOR = (QuantizationStrategy.TENSOR, QuantizationStrategy.CHANNEL)


def fast_fake_quantizable(
    args: QuantizationArgs,
    value: torch.Tensor,
    scale: torch.Tensor | None,
    zero_point: torch.Tensor | None,
    global_scale: torch.Tensor | None = None,
) -> bool:
    """Whether ``fake_quantize_int`` computes exactly what compressed-tensors' ``fake_quantize``
    does for ``value`` with these static qparams: an integer grid, one scale for the tensor or
    one per row of a 2-D weight, no global scale, and the scale in the value's dtype."""
    if (
        args.type != QuantizationType.INT
        or args.strategy not in _ROWS_OR_TENSOR
        or global_scale is not None
        or scale is None
        or scale.dtype != value.dtype
        or (zero_point is not None and zero_point.is_floating_point())
    ):
        return False
    if args.strategy == QuantizationStrategy.TENSOR:
        return scale.numel() == 1
    # channel: a weight's rows (compressed-tensors' scale shape (rows, 1))
    return value.dim() == 2 and scale.shape == (value.shape[0], 1)


@torch.no_grad()
def fake_quantize_int(
    value: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    args: QuantizationArgs,
) -> torch.Tensor:
    """Quantize then dequantize ``value`` on ``args``' integer grid with a static scale per
    tensor or per row: compressed-tensors' arithmetic (``value / scale``, plus the zero point,
    clamped to the grid, rounded half to even, minus the zero point, times the scale) in one
    buffer. Only for what ``fast_fake_quantizable`` accepts.

    A zero point of zeros (symmetric grids) is neither added nor subtracted: the values are
    the same, and only an input of -0.0 keeps its sign (compressed-tensors' ``+ 0`` turns it
    into +0.0), which no product with it can tell apart."""
    low, high = calculate_range(args, value.device)
    out = value / scale
    if zero_point is None or not zero_point.any():
        out.clamp_(float(low), float(high)).round_()
        return out.mul_(scale)
    offset = zero_point.to(value.dtype)
    out.add_(offset).clamp_(float(low), float(high)).round_()
    return out.sub_(offset).mul_(scale)


def _fast_qparams(
    module: torch.nn.Module, value: torch.Tensor, base: str, args: Any
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``module``'s static ``base`` (``input`` or ``weight``) scale and zero point when
    ``fake_quantize_int`` computes exactly what compressed-tensors does for ``value``; None
    when compressed-tensors' own path must."""
    scale = getattr(module, f"{base}_scale", None)
    zero_point = getattr(module, f"{base}_zero_point", None)
    global_scale = getattr(module, f"{base}_global_scale", None)
    if not value.numel() or not fast_fake_quantizable(args, value, scale, zero_point, global_scale):
        return None
    assert scale is not None
    return scale, zero_point


def _fake_quantize(module: torch.nn.Module, value: torch.Tensor, base: str, args: Any):
    """``value`` fake-quantized with ``module``'s static ``base`` (``input`` or ``weight``)
    qparams: the fast path when it is exact, compressed-tensors' otherwise."""
    qparams = _fast_qparams(module, value, base, args)
    if qparams is not None:
        return fake_quantize_int(value, *qparams, args)
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    return forward_quantize(module, value, base, args)


def _is_compressed_tensors_forward(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward is the one compressed-tensors set (``quantized_forward``)."""
    forward = module.__dict__.get("forward")
    function = getattr(forward, "__func__", None)
    code = getattr(function, "__code__", None)
    return code is not None and code.co_name == "quantized_forward"


class _LastInput:
    """The last input fake-quantized on the fast path and its result: q/k/v (and gate/up)
    read one tensor, and their input scales are usually equal (observed over the same
    batches), so the second and third get the first's result. Reused only for the same
    tensor object, unchanged since (its version), with equal scale, zero point and args.

    The input is held by a weak reference, and the entry dropped with it: held strongly, the
    last input of a stage and its result outlived the stage (a kept down_proj input is a
    view of the block of every kept input, which then stayed in memory through the next
    layer's first stages: bench/results/2026-12-02-w8a8-peak.md)."""

    def __init__(self) -> None:
        self.entry: tuple[Any, ...] | None = None

    def _forget(self, reference: weakref.ref) -> None:
        if self.entry is not None and self.entry[0] is reference:
            self.entry = None

    def fake_quantize(self, module: torch.nn.Module, value: torch.Tensor, args: Any):
        qparams = _fast_qparams(module, value, "input", args)
        if qparams is None:
            return _fake_quantize(module, value, "input", args)
        scale, zero_point = qparams
        entry = self.entry
        if (
            entry is not None
            and entry[0]() is value
            and entry[1] == value._version
            and entry[4] == args
            and torch.equal(entry[2], scale)
            and _equal_or_both_none(entry[3], zero_point)
        ):
            return entry[5]
        result = fake_quantize_int(value, scale, zero_point, args)
        saved_zero = None if zero_point is None else zero_point.clone()
        held = weakref.ref(value, self._forget)
        self.entry = (held, value._version, scale.clone(), saved_zero, args, result)
        return result


def _equal_or_both_none(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


def _calibration_forward(module: torch.nn.Linear, original: Any, last: _LastInput) -> Any:
    """The forward of a quantized Linear during calibration: compressed-tensors' meaning
    (quantization off: the plain product; on: the input and weight fake-quantized), its
    arithmetic through ``_fake_quantize``; what it does not cover goes to ``original``."""

    def forward(input: torch.Tensor) -> torch.Tensor:
        scheme = getattr(module, "quantization_scheme", None)
        status = getattr(module, "quantization_status", None)
        if scheme is None or status is None or not getattr(module, "quantization_enabled", True):
            return original(input)
        if (
            status >= QuantizationStatus.COMPRESSED
            or scheme.output_activations is not None
            or (scheme.input_activations is not None and scheme.input_activations.dynamic)
        ):
            return original(input)
        weight = module.weight  # onloaded once, as compressed-tensors does
        if isinstance(weight, DTensor) or isinstance(input, DTensor):  # tensor parallelism
            return original(input)
        if scheme.input_activations is not None:
            input = last.fake_quantize(module, input, scheme.input_activations)
        if scheme.weights is not None:
            weight = _fake_quantize(module, weight.data, "weight", scheme.weights)
        return torch.nn.functional.linear(input, weight, module.bias)

    return forward


class CalibrationForwards:
    """Puts the calibration forward on quantized Linears and gives their own back.

    Only modules whose forward is compressed-tensors' and whose class computes a plain
    ``torch.nn.Linear`` product get it.
    """

    def __init__(self) -> None:
        self._originals: list[tuple[torch.nn.Module, Any]] = []
        self._last = _LastInput()

    def install(self, modules: Iterable[torch.nn.Module]) -> int:
        """Install the calibration forward on ``modules`` (those it suits).

        :return: how many modules got it
        """
        count = 0
        for module in modules:
            if type(module).forward is not torch.nn.Linear.forward:
                continue
            if not _is_compressed_tensors_forward(module):
                continue
            original = module.__dict__["forward"]
            self._originals.append((module, original))
            forward = _calibration_forward(module, original, self._last)
            module.forward = forward  # type: ignore[method-assign]
            count += 1
        return count

    def remove(self) -> None:
        """Give every module its compressed-tensors forward back."""
        while self._originals:
            module, original = self._originals.pop()
            module.forward = original  # type: ignore[method-assign]
        self._last.entry = None

    def __len__(self) -> int:
        return len(self._originals)
