"""Cayley SGD: gradient descent that keeps a square matrix exactly orthogonal.

Li, Li and Todorovic 2020, "Efficient Riemannian optimization on the Stiefel manifold via the
Cayley transform" (arXiv:2002.01113), Algorithm 1 (Cayley SGD with momentum), the optimizer
SpinQuant trains its rotations with (Liu et al. 2024, arXiv:2405.16406, section 3.2).

For an orthogonal ``X`` and the loss's Euclidean gradient ``G`` (with momentum ``M``), the
skew-symmetric matrix ``W = (M X^T - X M^T) / 2`` generates a curve on the orthogonal group, and
the Cayley transform takes a step along it:

    X' = (I + a/2 W)^{-1} (I - a/2 W) X

which is orthogonal whenever ``X`` is, since ``(I + a/2 W)^{-1} (I - a/2 W)`` is orthogonal for
any skew-symmetric ``W``. Li et al. approximate the inverse by a fixed-point iteration (cheap on
a GPU, orthogonal only up to its tolerance); here it is one linear solve in float64, so the
result stays orthogonal to rounding error however many steps are taken. The step size is
capped at ``1 / ||W||_1`` as in their algorithm, which keeps a large learning rate (SpinQuant's
is 1.5) from overshooting where the gradient is large.
"""

from __future__ import annotations

import torch

__all__ = ["cayley_sgd_step", "orthogonality_error"]


@torch.no_grad()
def cayley_sgd_step(
    rotation: torch.Tensor,
    grad: torch.Tensor,
    buffer: torch.Tensor | None,
    lr: float,
    momentum: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Cayley SGD step on an orthogonal matrix.

    :param rotation: the orthogonal ``(n, n)`` matrix (float64 keeps it orthogonal to ~1e-15)
    :param grad: the loss's gradient with respect to ``rotation``
    :param buffer: the momentum of the previous step (None on the first)
    :param lr: the learning rate; the step taken is ``min(lr, 1 / ||W||_1)``
    :param momentum: the momentum coefficient, in ``[0, 1)``
    :return: the new rotation and the new momentum (the step's direction, in the tangent space)
    """
    m = grad if buffer is None or momentum == 0 else momentum * buffer + grad
    skew = 0.5 * (m @ rotation.T - rotation @ m.T)
    norm = torch.linalg.matrix_norm(skew, ord=1).item()
    step = min(lr, 1.0 / (norm + 1e-8))
    eye = torch.eye(rotation.shape[0], dtype=rotation.dtype, device=rotation.device)
    half = 0.5 * step * skew
    updated = torch.linalg.solve(eye + half, (eye - half) @ rotation)
    return updated, skew @ rotation


def orthogonality_error(rotation: torch.Tensor) -> float:
    """``max |R^T R - I|``, computed in float64."""
    r = rotation.detach().to(torch.float64)
    eye = torch.eye(r.shape[0], dtype=torch.float64, device=r.device)
    return (r.T @ r - eye).abs().max().item()
