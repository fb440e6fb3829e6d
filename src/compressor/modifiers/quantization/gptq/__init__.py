"""GPTQ: second-order weight quantization (Frantar et al., 2022)."""

from compressor.modifiers.quantization.gptq.gptq import (
    GPTQResult,
    accumulate_hessian,
    gptq_quantize_weight,
    inverse_hessian_cholesky,
    round_to_nearest,
)

__all__ = [
    "GPTQResult",
    "accumulate_hessian",
    "gptq_quantize_weight",
    "inverse_hessian_cholesky",
    "round_to_nearest",
]
