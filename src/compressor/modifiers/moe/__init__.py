"""Mixture-of-experts support shared by the compressing modifiers.

``experts``: fused 3-D experts unfolded into one Linear per expert and projection (the
checkpoint's per-expert layout), and folded back, with the pure weight split in ``weights``;
``prepare.prepare_experts`` is what a modifier calls on initialize. ``coverage``: all-expert
calibration and the per-expert token counts.
"""

from compressor.modifiers.moe.coverage import (
    ExpertCalibrationFields,
    ExpertCoverage,
    starved_experts,
)
from compressor.modifiers.moe.experts import (
    ExpertMLP,
    LinearExperts,
    fold_experts,
    unfold_experts,
)
from compressor.modifiers.moe.prepare import PreparedExperts, keep_routing_exact, prepare_experts
from compressor.modifiers.moe.weights import ExpertMatrices, expert_matrices, fused_matrices

__all__ = [
    "ExpertCalibrationFields",
    "ExpertMatrices",
    "ExpertCoverage",
    "ExpertMLP",
    "LinearExperts",
    "PreparedExperts",
    "expert_matrices",
    "fold_experts",
    "fused_matrices",
    "keep_routing_exact",
    "prepare_experts",
    "starved_experts",
    "unfold_experts",
]
