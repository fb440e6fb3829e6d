"""GPTQ: second-order weight quantization (Frantar et al., 2022)."""

from compressor.modifiers.quantization.gptq.gptq import (
    GPTQResult,
    gptq_quantize_weight,
    gptq_quantize_weights,
    round_to_nearest,
)
from compressor.modifiers.quantization.gptq.hessian import (
    SharedHessians,
    accumulate_hessian,
    inverse_hessian_cholesky,
    symmetrize_upper_,
)

__all__ = [
    "GPTQResult",
    "SharedHessians",
    "accumulate_hessian",
    "gptq_quantize_weight",
    "gptq_quantize_weights",
    "inverse_hessian_cholesky",
    "round_to_nearest",
    "symmetrize_upper_",
]
