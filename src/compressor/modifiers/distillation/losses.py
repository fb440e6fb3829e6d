"""Distillation losses as pure functions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss", "hidden_state_loss", "square_head_loss"]


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over positions."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def hidden_state_loss(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean of the mean squared errors between student and teacher hidden states."""
    if not pairs:
        raise ValueError("no hidden states to compare")
    return torch.stack([F.mse_loss(s.float(), t.float()) for s, t in pairs]).mean()


def square_head_loss(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the pairs of ``sum((teacher - student)^2) / sum(teacher^2)``: each layer's
    squared error relative to the teacher output's energy ("square head", Kurtic et al. 2023,
    "Sparse Fine-tuning for Inference Acceleration of Large Language Models",
    arXiv:2310.06927), so layers of different scale weigh alike.

    :param pairs: (student output, teacher output), each ``[batch, tokens, ...]``
    :param mask: ``[batch, tokens]``, true at the tokens to compare (the attention mask);
        None compares every token
    """
    if not pairs:
        raise ValueError("no layer outputs to compare")
    losses = []
    for student, teacher in pairs:
        if student.shape != teacher.shape:
            raise ValueError(
                f"student output {tuple(student.shape)} and teacher output "
                f"{tuple(teacher.shape)} differ in shape"
            )
        if mask is not None:
            student, teacher = student[mask], teacher[mask]
        student, teacher = student.float(), teacher.float()
        losses.append(torch.sum(torch.square(teacher - student)) / torch.sum(torch.square(teacher)))
    return torch.stack(losses).mean()
