"""Distillation from a teacher model."""

from compressor.modifiers.distillation.base import OutputDistillationModifier
from compressor.modifiers.distillation.losses import distillation_loss, hidden_state_loss

__all__ = ["OutputDistillationModifier", "distillation_loss", "hidden_state_loss"]
