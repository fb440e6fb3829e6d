"""Mixture-of-experts support shared by the compressing modifiers.

``experts``: fused 3-D experts unfolded into one Linear per expert and projection (the
checkpoint's per-expert layout), and folded back; ``prepare_experts`` is what a modifier
calls on initialize. ``coverage``: all-expert calibration and the per-expert token counts.
"""

from compressor.modifiers.moe.coverage import (
    ExpertCalibrationFields,
    ExpertCoverage,
    starved_experts,
)
from compressor.modifiers.moe.experts import (
    ExpertMLP,
    LinearExperts,
    PreparedExperts,
    expert_matrices,
    fold_experts,
    fused_matrices,
    keep_routing_exact,
    prepare_experts,
    unfold_experts,
)

__all__ = [
    "ExpertCalibrationFields",
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
