"""SparseGPT: one-shot pruning with the inverse Hessian (Frantar & Alistarh, 2023)."""

from compressor.modifiers.pruning.sparsegpt.base import SparseGPTModifier
from compressor.modifiers.pruning.sparsegpt.sparsegpt import SparseGPTResult, sparsegpt_prune

__all__ = ["SparseGPTModifier", "SparseGPTResult", "sparsegpt_prune"]
