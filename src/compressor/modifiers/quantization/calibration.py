"""Setting the scales of a compressed-tensors quantized module from observed ranges."""

from __future__ import annotations

import torch
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus

from compressor.modifiers.quantization.observers import qparams_from_range, weight_range

__all__ = [
    "bake_quantized_weight",
    "freeze_quantization",
    "set_qparams",
    "static_activation_roles",
    "update_weight_qparams",
]

_ROLE_TO_BASE = {"input_activations": "input", "output_activations": "output"}


def set_qparams(
    module: torch.nn.Module,
    base_name: str,
    lo: torch.Tensor,
    hi: torch.Tensor,
    args: QuantizationArgs,
    where: str,
) -> None:
    """Write the scale (and zero point, when the module has one) for a range in place.

    :param base_name: ``weight``, ``input`` or ``output``
    :param where: the module's name, for errors about NaN or inf ranges
    """
    scale, zero_point = qparams_from_range(lo, hi, args, f"{where} ({base_name})")
    # through update_offload_parameter: an offloaded module is updated where it lives
    param = getattr(module, f"{base_name}_scale")
    update_offload_parameter(
        module, f"{base_name}_scale", scale.reshape(param.shape).to(param.dtype)
    )
    zp_param = getattr(module, f"{base_name}_zero_point", None)
    if zp_param is not None:
        update_offload_parameter(
            module,
            f"{base_name}_zero_point",
            zero_point.reshape(zp_param.shape).to(zp_param.dtype),
        )


def update_weight_qparams(
    module: torch.nn.Module, name: str, args: QuantizationArgs | None = None
) -> None:
    """Scales and zero points of a module's weight from its current values.

    :param args: the weight's quantization args (the module's scheme when None)
    """
    if args is None:
        args = module.quantization_scheme.weights
    if args is None:
        return
    lo, hi = weight_range(module.weight, args)
    set_qparams(module, "weight", lo, hi, args, name)


def static_activation_roles(module: torch.nn.Module) -> dict[str, QuantizationArgs]:
    """``{"input": args, "output": args}`` for the activations that need observed ranges."""
    scheme = getattr(module, "quantization_scheme", None)
    roles = {}
    for role, base in _ROLE_TO_BASE.items():
        args = getattr(scheme, role, None) if scheme is not None else None
        if args is not None and not args.dynamic:
            roles[base] = args
    return roles


def freeze_quantization(module: torch.nn.Module) -> None:
    """Mark a calibrated module frozen: its forward uses its fixed scales from now on."""
    module.quantization_status = QuantizationStatus.FROZEN


@torch.no_grad()
def bake_quantized_weight(
    module: torch.nn.Module, args: QuantizationArgs, name: str, levels: str | None = None
) -> None:
    """Replace a weight by its quantized values, for modules compressed-tensors cannot hold
    (convolutions): the forward then computes with exactly the quantized weight.

    :param levels: ``ternary`` or ``binary`` instead of ``args``' integer grid
    """
    from compressor.modifiers.quantization.fake_quant import fake_quantize_weight, low_bit_weight

    if levels is not None:
        values, _ = low_bit_weight(module.weight, levels)  # type: ignore[arg-type]
    else:
        values = fake_quantize_weight(module.weight, args, where=name)
    update_offload_parameter(module, "weight", values.to(module.weight.dtype))
