"""Transforms that change a model's weights without changing its function (rotations)."""

from compressor.modifiers.transform.spinquant import SpinQuantModifier

__all__ = ["SpinQuantModifier"]
