"""Orthogonal rotation matrices for SpinQuant, built from compressed-tensors' Hadamard tables.

- ``hadamard``: Sylvester's construction for powers of two; other sizes ``k * 2**m`` use the
  known Hadamard matrix of order ``k`` that compressed-tensors ships (``k`` a multiple of 4 up
  to 256), combined by a Kronecker product. The known matrices are read from the table file
  compressed-tensors builds its ``random_hadamard_matrix`` from (public functions only: no
  private helper); without that file, only powers of two are supported (a test pins that the
  file holds the orders compressed-tensors' own construction accepts).
- ``random-hadamard``: compressed-tensors' Hadamard with random signs (same supported sizes).
- ``random-matrix``: a Haar-random orthogonal matrix (QR of a Gaussian), any size.
  compressed-tensors' own ``random-matrix`` transform is a uniform random (not orthogonal)
  matrix; that breaks the RMSNorm invariance R1 relies on, so it is not used here.

Every matrix is normalised to be orthogonal (``R @ R.T == I``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

import compressed_tensors.transform.utils.hadamard as ct_hadamard
import torch
from compressed_tensors.transform.utils.hadamard import (
    deterministic_hadamard_matrix,
    is_pow2,
    random_hadamard_matrix,
)
from loguru import logger
from safetensors import safe_open

__all__ = [
    "TRANSFORM_TYPES",
    "TransformType",
    "hadamard_supported",
    "hadamard_table_path",
    "known_hadamard",
    "rotation_matrix",
    "supported_hadamard_orders",
]

TransformType = Literal["hadamard", "random-hadamard", "random-matrix"]
TRANSFORM_TYPES: tuple[str, ...] = ("hadamard", "random-hadamard", "random-matrix")
_CT_DIR = Path(ct_hadamard.__file__).parent


def hadamard_table_path() -> Path | None:
    """The file of known Hadamard matrices (one tensor per order, keyed ``"k"``) that
    compressed-tensors ships beside ``random_hadamard_matrix``, or None when it is missing."""
    candidates = [getattr(ct_hadamard, "REPO_PATH", None), _CT_DIR / "hadamards.safetensors"]
    return next((Path(c) for c in candidates if c is not None and Path(c).is_file()), None)


@functools.cache
def supported_hadamard_orders() -> tuple[int, ...]:
    """The orders ``k`` of the known Hadamard matrices compressed-tensors ships (1 alone, that
    is powers of two only, when its table file cannot be found)."""
    path = hadamard_table_path()
    if path is None:
        logger.warning(
            "compressed-tensors' table of known Hadamard matrices was not found beside {}: "
            "Hadamard rotations are limited to powers of two",
            ct_hadamard.__file__,
        )
        return (1,)
    with safe_open(str(path), framework="pt") as file:
        return tuple(sorted({1, *(int(key) for key in file.keys())}))  # noqa: SIM118


def known_hadamard(order: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The known (unnormalised, entries +-1) Hadamard matrix of ``order`` from
    compressed-tensors' table.

    :raises ValueError: when the table holds no matrix of that order
    """
    path = hadamard_table_path()
    if order not in supported_hadamard_orders() or path is None:
        raise ValueError(f"compressed-tensors ships no known Hadamard matrix of order {order}")
    if order == 1:
        return torch.ones(1, 1, dtype=dtype)
    with safe_open(str(path), framework="pt") as file:
        return file.get_tensor(str(order)).to(dtype)


def hadamard_supported(size: int) -> bool:
    """Whether a Hadamard matrix of order ``size`` can be built: ``k * 2**m`` for a known ``k``."""
    if size <= 0:
        return False
    return any(size % k == 0 and is_pow2(size // k) for k in supported_hadamard_orders())


def _unsupported(size: int, transform_type: str) -> ValueError:
    odd = [k for k in supported_hadamard_orders() if not is_pow2(k)]
    known = f"{odd[0]}, {odd[1]}, then multiples of 4 up to {odd[-1]}" if len(odd) > 2 else "none"
    return ValueError(
        f"transform_type={transform_type!r} cannot rotate size {size}: a Hadamard matrix needs "
        f"a power of two or an order k * 2**m with k in compressed-tensors' known orders "
        f"({known}); use transform_type='random-matrix' (a random orthogonal matrix of any size)"
    )


def _hadamard(size: int, dtype: torch.dtype) -> torch.Tensor:
    if is_pow2(size):
        return deterministic_hadamard_matrix(size, dtype=dtype)
    # the largest known order whose quotient is a power of two (as compressed-tensors picks)
    order = max(
        (k for k in supported_hadamard_orders() if size % k == 0 and is_pow2(size // k)),
        default=None,
    )
    if order is None:
        raise _unsupported(size, "hadamard")
    return torch.kron(
        deterministic_hadamard_matrix(size // order, dtype=dtype), known_hadamard(order, dtype)
    )


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
