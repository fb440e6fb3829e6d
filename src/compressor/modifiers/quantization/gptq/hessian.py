"""The Hessian of a Linear's inputs, as GPTQ needs it: accumulated and inverted with care.

GPTQ (Frantar et al., 2022) weighs each weight column's rounding error by the inverse of
``H = 2/n sum x x^T`` over the layer's inputs ``x``. ``accumulate_hessian`` keeps a running mean
batch by batch; ``inverse_hessian_cholesky`` dampens ``H`` and returns the upper Cholesky factor
of its inverse, raising the dampening when ``H`` is not positive definite.
"""

from __future__ import annotations

import torch
from loguru import logger

__all__ = [
    "accumulate_hessian",
    "batch_hessian",
    "inverse_hessian_cholesky",
    "symmetrize_upper_",
]

_MAX_DAMPENING_RETRIES = 8
_SYMMETRIC_BLOCK = 128
"""Block rows of the upper-triangle-only Hessian update (see ``accumulate_hessian``)."""


def batch_hessian(inputs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One batch's own Hessian ``2/n x^T x`` over the ``n`` tokens of a Linear's inputs
    ``(..., in_features)``, in ``dtype``."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).to(dtype)
    out = torch.empty(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
    return torch.addmm(out, x.t(), x, beta=0.0, alpha=2.0 / max(x.shape[0], 1))


def accumulate_hessian(
    inputs: torch.Tensor,
    hessian: torch.Tensor | None = None,
    num_samples: int = 0,
    dtype: torch.dtype = torch.float32,
    batch: torch.Tensor | None = None,
    upper_only: bool = False,
) -> tuple[torch.Tensor, int]:
    """Fold a batch of a Linear's inputs into the running Hessian ``H = 2/n sum_t x_t x_t^T``.

    Every token (every row after flattening the leading dimensions) is one sample. ``H`` is
    kept as a running mean, the old mean rescaled in the same fused product that adds the new
    inputs, so it never holds a large unnormalised sum (and costs one kernel per batch).

    :param inputs: ``(..., in_features)`` activations entering the Linear
    :param hessian: the Hessian so far (updated in place), or None to start one
    :param num_samples: how many samples ``hessian`` already averages
    :param dtype: accumulation dtype (float32, or float64 for extra care)
    :param batch: ``batch_hessian(inputs)`` when already computed (several Linears reading
        the same inputs share it); else the update is one fused product with ``inputs``
    :param upper_only: update only the block rows on and above the diagonal (the Hessian is
        symmetric): about 40% fewer operations for wide inputs; the entries below the
        diagonal blocks are then stale until ``symmetrize_upper_``
    :return: the updated Hessian and sample count
    """
    x = inputs.detach().reshape(-1, inputs.shape[-1])
    if hessian is None:
        hessian = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
    if hessian.shape != (x.shape[1], x.shape[1]):
        raise ValueError(
            f"inputs have {x.shape[1]} features but the Hessian is {tuple(hessian.shape)}"
        )
    new = x.shape[0]
    if new == 0:
        return hessian, num_samples
    total = num_samples + new
    if batch is not None:
        # H <- H + new / n (B - H) = H * n_old / n + (2 / n) x^T x, with B = 2 / new x^T x
        hessian.lerp_(batch.to(hessian), new / total)
        return hessian, total
    x = x.to(device=hessian.device, dtype=hessian.dtype)
    beta, alpha = num_samples / total, 2.0 / total
    width = x.shape[1]
    if upper_only and width >= 2 * _SYMMETRIC_BLOCK:
        for start in range(0, width, _SYMMETRIC_BLOCK):
            stop = min(start + _SYMMETRIC_BLOCK, width)
            hessian[start:stop, start:].addmm_(
                x[:, start:stop].t(), x[:, start:], beta=beta, alpha=alpha
            )
        return hessian, total
    # one fused update: H <- H * n_old / n + (2 / n) x^T x
    hessian.addmm_(x.t(), x, beta=beta, alpha=alpha)
    return hessian, total


def symmetrize_upper_(hessian: torch.Tensor) -> torch.Tensor:
    """Copy the upper triangle of ``hessian`` onto its lower one, in place (after
    ``accumulate_hessian(upper_only=True)``); block by block, so no full-size temporary."""
    width = hessian.shape[0]
    for start in range(0, width, _SYMMETRIC_BLOCK):
        stop = min(start + _SYMMETRIC_BLOCK, width)
        diagonal = hessian[start:stop, start:stop]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).t())
        hessian[stop:, start:stop].copy_(hessian[start:stop, stop:].t())
    return hessian


def inverse_hessian_cholesky(
    hessian: torch.Tensor, dampening_frac: float = 0.01, *, overwrite: bool = False
) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of the inverse of the dampened Hessian.

    Adds ``dampening_frac * mean(diag H)`` to the diagonal and factorizes in float32 (as GPTQ
    implementations do; on CPU float64 costs several times more for large inputs). When that
    fails, the same dampening is retried in float64 before the dampening is raised tenfold
    (with a warning) until the matrix is positive definite.

    :param hessian: symmetric ``(n, n)`` Hessian (dead columns already handled)
    :param dampening_frac: fraction of the mean diagonal added to the diagonal
    :param overwrite: the caller no longer needs ``hessian`` (float32): it is dampened in
        place instead of copied, which saves a matrix of memory for the largest layers
    :return: ``U`` with ``U^T U = (H + damp I)^-1`` (float32), and the dampening used
    """
    # one reduction instead of an elementwise isfinite: a NaN or inf anywhere makes it non-finite
    if not torch.isfinite(hessian.sum(dtype=torch.float64)):
        raise ValueError("the Hessian has NaN or infinite entries; check the calibration data")
    mean_diag = float(hessian.diagonal().abs().mean(dtype=torch.float64).clamp_min(1e-12))
    frac = dampening_frac
    for _ in range(_MAX_DAMPENING_RETRIES + 1):
        for dtype in (torch.float32, torch.float64):
            in_place = overwrite and hessian.dtype == dtype
            dampened = hessian if in_place else hessian.to(dtype=dtype, copy=True)
            dampened.diagonal().add_(frac * mean_diag)
            upper, ok = _upper_cholesky_of_inverse(dampened)
            if in_place:
                dampened.diagonal().sub_(frac * mean_diag)  # as it came, for a retry
            if ok:
                return upper.to(torch.float32), frac
            del dampened, upper
        raised = max(frac * 10.0, 1e-4)
        logger.warning(
            "Hessian is not positive definite with dampening_frac={:g}; retrying with {:g}",
            frac,
            raised,
        )
        frac = raised
    raise ValueError(
        f"the Hessian is not positive definite even with dampening_frac={frac:g}; "
        "check the calibration data"
    )


def _upper_cholesky_of_inverse(h: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``U`` upper triangular with ``U^T U = h^-1``, from one Cholesky and one triangular solve.

    With ``J`` the reversal permutation and ``J h J = L L^T``, ``U = J L^-1 J`` is upper
    triangular and ``U^T U = J L^-T L^-1 J = J (J h J)^-1 J = h^-1``. (Avoids
    ``cholesky_inverse`` followed by a second Cholesky, which is much slower on CPU.) Both
    factorizations work in place, so at most two matrices besides ``h`` exist at once.
    """
    lower = h.flip(0, 1)
    info = torch.empty((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(lower, out=(lower, info))
    if info != 0 or not torch.isfinite(lower.diagonal()).all():
        return h, False
    inverse = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    # a successful Cholesky has a positive diagonal, so the triangular inverse exists
    torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
    del lower
    return inverse.flip(0, 1), True
