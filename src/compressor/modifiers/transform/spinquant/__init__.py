"""SpinQuant: R1 and R2 rotations fused into the weights (Liu et al. 2024)."""

from compressor.modifiers.transform.spinquant.apply import apply_fused_transforms
from compressor.modifiers.transform.spinquant.base import SpinQuantModifier
from compressor.modifiers.transform.spinquant.fusion import (
    fuse_norm_into_linears,
    rotate_input,
    rotate_output,
    untie_word_embeddings,
)
from compressor.modifiers.transform.spinquant.mappings import (
    NormMapping,
    SpinQuantMapping,
    infer_mapping_from_model,
    infer_norm_mappings_from_model,
)
from compressor.modifiers.transform.spinquant.matrices import hadamard_supported, rotation_matrix

__all__ = [
    "NormMapping",
    "SpinQuantMapping",
    "SpinQuantModifier",
    "apply_fused_transforms",
    "fuse_norm_into_linears",
    "hadamard_supported",
    "infer_mapping_from_model",
    "infer_norm_mappings_from_model",
    "rotate_input",
    "rotate_output",
    "rotation_matrix",
    "untie_word_embeddings",
]
