"""Orthogonal rotation matrices for SpinQuant, built from compressed-tensors' Hadamard tables.

- ``hadamard``: Sylvester's construction for powers of two; other sizes ``k * 2**m`` use the
  known Hadamard matrix of order ``k`` that compressed-tensors ships (``k`` a multiple of 4 up
  to 256), combined by a Kronecker product.
- ``random-hadamard``: compressed-tensors' Hadamard with random signs (same supported sizes).
- ``random-matrix``: a Haar-random orthogonal matrix (QR of a Gaussian), any size.
  compressed-tensors' own ``random-matrix`` transform is a uniform random (not orthogonal)
  matrix; that breaks the RMSNorm invariance R1 relies on, so it is not used here.

Every matrix is normalised to be orthogonal (``R @ R.T == I``).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
from compressed_tensors.transform.utils.hadamard import (
    _fetch_hadamard_divisor,
    deterministic_hadamard_matrix,
    is_pow2,
    random_hadamard_matrix,
)

__all__ = [
    "TRANSFORM_TYPES",
    "TransformType",
    "hadamard_supported",
    "rotation_matrix",
    "supported_hadamard_orders",
]

TransformType = Literal["hadamard", "random-hadamard", "random-matrix"]
TRANSFORM_TYPES: tuple[str, ...] = ("hadamard", "random-hadamard", "random-matrix")


@functools.cache
def supported_hadamard_orders() -> tuple[int, ...]:
    """The orders ``k`` of the known Hadamard matrices compressed-tensors ships."""
    from compressed_tensors.transform.utils.hadamard import REPO_PATH
    from safetensors import safe_open

    with safe_open(str(REPO_PATH), framework="pt") as file:
        return tuple(sorted(int(key) for key in file.keys()))  # noqa: SIM118


def hadamard_supported(size: int) -> bool:
    """Whether a Hadamard matrix of order ``size`` can be built: ``k * 2**m`` for a known ``k``."""
    if size <= 0:
        return False
    return any(size % k == 0 and is_pow2(size // k) for k in supported_hadamard_orders())


def _unsupported(size: int, transform_type: str) -> ValueError:
    orders = supported_hadamard_orders()
    return ValueError(
        f"transform_type={transform_type!r} cannot rotate size {size}: a Hadamard matrix needs "
        f"an order k * 2**m with k in compressed-tensors' known orders "
        f"({orders[0]}, {orders[1]}, {orders[2]}, then multiples of 4 up to {orders[-1]}); "
        "use transform_type='random-matrix' (a random orthogonal matrix of any size)"
    )


def _hadamard(size: int, dtype: torch.dtype) -> torch.Tensor:
    if is_pow2(size):
        return deterministic_hadamard_matrix(size, dtype=dtype)
    known = _fetch_hadamard_divisor(size, dtype=dtype)
    if known is None:
        raise _unsupported(size, "hadamard")
    return torch.kron(deterministic_hadamard_matrix(size // known.shape[0], dtype=dtype), known)


def rotation_matrix(
    transform_type: TransformType,
    size: int,
    *,
    randomize: bool = False,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """An orthogonal ``size x size`` matrix.

    :param transform_type: ``hadamard``, ``random-hadamard`` or ``random-matrix``
    :param size: the order of the matrix
    :param randomize: for ``hadamard``, permute rows and columns by one random permutation
        (still a Hadamard matrix); the random types are random anyway
    :param generator: the source of randomness (seeded by the caller for reproducibility)
    :param dtype: the precision the matrix is built and returned in
    :raises ValueError: for an unknown type, or a Hadamard type at an unsupported size
    """
    if transform_type not in TRANSFORM_TYPES:
        raise ValueError(
            f"transform_type must be one of {', '.join(TRANSFORM_TYPES)}; got {transform_type!r}"
        )
    if size <= 0:
        raise ValueError(f"a rotation needs a positive size, got {size}")
    if transform_type == "random-matrix":
        gaussian = torch.randn(size, size, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        return (q * torch.sign(torch.diagonal(r))).to(dtype)
    if not hadamard_supported(size):
        raise _unsupported(size, transform_type)
    if transform_type == "random-hadamard":
        matrix = random_hadamard_matrix(size, dtype=torch.float64, gen=generator)
    else:
        matrix = _hadamard(size, torch.float64)
        if randomize:
            perm = torch.randperm(size, generator=generator)
            matrix = matrix[perm][:, perm]
    return (matrix / math.sqrt(size)).to(dtype)
