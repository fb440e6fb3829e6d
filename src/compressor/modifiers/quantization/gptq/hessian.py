"""The Hessian of a Linear's inputs, as GPTQ needs it: accumulated and inverted with care.

GPTQ (Frantar et al., 2022) weighs each weight column's rounding error by the inverse of
``H = 2/n sum x x^T`` over the layer's inputs ``x``. ``accumulate_hessian`` keeps a running mean
batch by batch; ``inverse_hessian_cholesky`` dampens ``H`` and returns the upper Cholesky factor
of its inverse, raising the dampening when ``H`` is not positive definite.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from loguru import logger

__all__ = [
    "SharedHessians",
    "accumulate_hessian",
    "inverse_hessian_cholesky",
    "symmetrize_upper_",
]

_MAX_DAMPENING_RETRIES = 8
_SYMMETRIC_BLOCK = 128
"""Block rows of the upper-triangle-only Hessian update (see ``accumulate_hessian``)."""


def accumulate_hessian(
    inputs: torch.Tensor,
    hessian: torch.Tensor | None = None,
    num_samples: int = 0,
    dtype: torch.dtype = torch.float32,
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


class _Set:
    """Linears that have read the very same tensors so far, and their one running Hessian."""

    __slots__ = ("count", "hessian", "members", "stale_lower")

    def __init__(self, members: set[str], hessian: torch.Tensor | None, count: int) -> None:
        self.members = members
        self.hessian = hessian
        self.count = count
        self.stale_lower = False

    def complete(self) -> torch.Tensor:
        """The Hessian, its lower triangle filled in from the upper one if stale."""
        assert self.hessian is not None
        if self.stale_lower:
            symmetrize_upper_(self.hessian)
            self.stale_lower = False
        return self.hessian


class SharedHessians:
    """Running Hessians of many Linears' inputs, one per set of Linears reading the same tensors.

    Linears called one after the other on the very same tensor object (a decoder layer's
    q/k/v projections, its gate/up projections) have equal Hessians: they form one set with
    one Hessian, and each such tensor's product ``x^T x`` is computed once, straight into it
    (no per-call temporary, no per-member copy). Each call's input is folded in lazily: it
    is kept until a call brings another tensor (or ``flush``), and by then every Linear that
    reads it has said so. (Deferring is safe: a Linear's input is saved for its backward, so
    models that train never change it in place afterwards.) Only the upper triangle is
    updated (``accumulate_hessian``'s ``upper_only``); the lower one is filled in when a
    Hessian is read.

    Nothing is assumed about the model: should a Linear stop reading what the rest of its set
    reads, the set is split, each part keeping a copy of the Hessian so far.

    :param dtype: accumulation dtype
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self._set_of: dict[str, _Set] = {}
        self._pending: tuple[torch.Tensor, list[str]] | None = None

    def observe(self, name: str, inputs: torch.Tensor) -> None:
        """Record that Linear ``name`` was called on ``inputs`` ``(..., in_features)``."""
        pending = self._pending
        if pending is not None and pending[0] is inputs and name not in pending[1]:
            pending[1].append(name)
            return
        self.flush()
        self._pending = (inputs, [name])

    def flush(self) -> None:
        """Fold the pending input into the Hessian(s) of the Linears that read it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        inputs, readers = pending
        by_set: dict[int, tuple[_Set | None, list[str]]] = {}
        for name in readers:
            current = self._set_of.get(name)
            by_set.setdefault(id(current), (current, []))[1].append(name)
        for current, names in by_set.values():
            target = self._set_for(current, names)
            target.hessian, target.count = accumulate_hessian(
                inputs, target.hessian, target.count, self.dtype, upper_only=True
            )
            target.stale_lower = True

    def _set_for(self, current: _Set | None, names: list[str]) -> _Set:
        """The set ``names`` form, splitting it off ``current`` if only part of it read."""
        if current is not None and current.members == set(names):
            return current
        hessian, count = None, 0
        if current is not None:  # the others read something else: they part ways here
            current.members -= set(names)
            if current.hessian is not None:
                hessian = current.complete().clone()
            count = current.count
        split = _Set(set(names), hessian, count)
        for name in names:
            self._set_of[name] = split
        return split

    def __contains__(self, name: object) -> bool:
        self.flush()
        return name in self._set_of

    def __iter__(self) -> Iterator[str]:
        self.flush()
        return iter(list(self._set_of))

    def __len__(self) -> int:
        self.flush()
        return len(self._set_of)

    def __getitem__(self, name: str) -> tuple[torch.Tensor, int]:
        """``name``'s Hessian (shared with the rest of its set: do not modify) and the
        number of samples (tokens) it averages."""
        self.flush()
        current = self._set_of[name]
        return current.complete(), current.count

    def same_set(self, first: str, second: str) -> bool:
        """Whether the two Linears have read exactly the same tensors (one Hessian)."""
        self.flush()
        return self._set_of[first] is self._set_of[second]

    def pop(self, names: list[str]) -> tuple[torch.Tensor, int]:
        """Remove ``names`` (one set, or part of one) and return their Hessian: the set's own
        tensor, free to overwrite, when they are its last members; else a copy."""
        hessian, count = self[names[0]]
        current = self._set_of[names[0]]
        for name in names:
            if self._set_of.get(name) is not current:
                raise ValueError(f"{name} does not share {names[0]}'s Hessian")
            del self._set_of[name]
            current.members.discard(name)
        return (hessian.clone() if current.members else hessian), count

    def clear(self) -> None:
        self._pending = None
        self._set_of.clear()

    # ------------------------------------------------ for the reduction across ranks
    def sets_within(self, names: list[str]) -> list[list[str]]:
        """The sets of ``names`` (those with a Hessian), each as its members in ``names``'
        order, the sets in order of their first member. A set that also holds Linears outside
        ``names`` is split first (each part keeping a copy of the Hessian), so that what is
        done to the returned sets touches no other Linear."""
        self.flush()
        wanted = set(names)
        seen: dict[int, list[str]] = {}
        for name in names:
            current = self._set_of.get(name)
            if current is None or id(current) in seen:
                continue
            if not current.members <= wanted:
                current = self._set_for(current, [n for n in names if n in current.members])
            seen[id(current)] = [n for n in names if n in current.members]
        return list(seen.values())

    def separate(self, name: str) -> None:
        """Give ``name`` a set of its own (a copy of its Hessian so far)."""
        self.flush()
        current = self._set_of.get(name)
        if current is not None:
            self._set_for(current, [name])

    def replace(self, names: list[str], hessian: torch.Tensor, count: int) -> None:
        """Make ``names`` (one whole set, or names without a Hessian) one set holding
        ``hessian`` over ``count`` samples (the Hessian over every rank's data)."""
        self.flush()
        sets = {id(s): s for n in names if (s := self._set_of.get(n)) is not None}
        if len(sets) > 1 or any(s.members != set(names) for s in sets.values()):
            raise ValueError(f"{names} are not one whole set of Linears")
        merged = _Set(set(names), hessian, count)
        for name in names:
            self._set_of[name] = merged


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
        place instead of copied, and on success ``U`` is written into its memory, which
        saves two matrices of memory for the largest layers
    :return: ``U`` with ``U^T U = (H + damp I)^-1`` (float32), and the dampening used
    """
    mean_diag = float(hessian.diagonal().abs().mean(dtype=torch.float64).clamp_min(1e-12))
    frac = dampening_frac
    for _ in range(_MAX_DAMPENING_RETRIES + 1):
        for dtype in (torch.float32, torch.float64):
            in_place = overwrite and hessian.dtype == dtype
            dampened = hessian if in_place else hessian.to(dtype=dtype, copy=True)
            dampened.diagonal().add_(frac * mean_diag)
            upper = _upper_cholesky_of_inverse(dampened)
            if upper is not None:  # in ``dampened``'s memory
                return upper.to(torch.float32), frac
            if in_place:
                dampened.diagonal().sub_(frac * mean_diag)  # as it came, for a retry
            del dampened
            # checked only on failure (a factor with a NaN or inf is refused): one reduction,
            # where a NaN or inf anywhere makes the sum non-finite
            if not torch.isfinite(hessian.sum(dtype=torch.float64)):
                raise ValueError(
                    "the Hessian has NaN or infinite entries; check the calibration data"
                )
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


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor | None:
    """``U`` upper triangular with ``U^T U = h^-1``, from one Cholesky and one triangular solve,
    written into ``h``'s memory; None (``h`` unchanged) when ``h`` is not positive definite.

    With ``J`` the reversal permutation and ``J h J = L L^T``, ``U = J L^-1 J`` is upper
    triangular and ``U^T U = J L^-T L^-1 J = J (J h J)^-1 J = h^-1``. (Avoids
    ``cholesky_inverse`` followed by a second Cholesky, which is much slower on CPU.) Both
    factorizations work in place, and ``h`` takes ``U`` once the Cholesky has succeeded, so
    no more than two such matrices ever exist at once.
    """
    # ``J h J`` is symmetric, so its transpose (a column-major view of the same memory) is
    # the same matrix: LAPACK factorizes that view in place, where a row-major ``out`` would
    # cost two transposing copies (a large share of the Cholesky's time on wide Hessians:
    # bench/results/2026-12-01-notes-gptq-memory.md)
    lower = h.flip(0, 1).t()
    info = torch.empty((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(lower, out=(lower, info))
    if info != 0 or not torch.isfinite(lower.diagonal()).all():
        return None
    inverse = h.zero_()  # h is no longer needed: its memory takes the inverse
    inverse.diagonal().fill_(1.0)
    # a successful Cholesky has a positive diagonal, so the triangular inverse exists
    torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
    del lower
    return _flip_square_(inverse)


def _flip_square_(matrix: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """``matrix.flip(0, 1)`` in place, for a contiguous matrix: reversing both axes reverses
    its flat storage, done ``chunk`` elements at a time from both ends (no full copy)."""
    flat = matrix.view(-1)
    size = flat.numel()
    half = size // 2
    for start in range(0, half, chunk):
        stop = min(start + chunk, half)
        head = flat[start:stop].clone()
        flat[start:stop] = flat[size - stop : size - start].flip(0)
        flat[size - stop : size - start] = head.flip(0)
    return matrix
