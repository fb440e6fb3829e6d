import math

import pytest
import torch

from compressor.modifiers.transform.spinquant import hadamard_supported, rotation_matrix


@pytest.mark.parametrize("transform_type", ["hadamard", "random-hadamard", "random-matrix"])
@pytest.mark.parametrize("size", [1, 8, 12, 64, 172])
def test_every_matrix_is_orthogonal(transform_type, size):
    matrix = rotation_matrix(transform_type, size, generator=torch.Generator().manual_seed(0))
    assert matrix.dtype == torch.float64 and matrix.shape == (size, size)
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(size, dtype=torch.float64))


@pytest.mark.parametrize("transform_type", ["hadamard", "random-hadamard"])
@pytest.mark.parametrize("size", [8, 12, 172])  # a power of two, and k * 2**m orders
def test_hadamard_entries_are_plus_minus_one_over_sqrt_n(transform_type, size):
    matrix = rotation_matrix(transform_type, size, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(matrix.abs(), torch.full_like(matrix, 1 / math.sqrt(size)))


def test_randomness_follows_the_generator():
    def draw(kind, seed, **kw):
        return rotation_matrix(kind, 16, generator=torch.Generator().manual_seed(seed), **kw)

    for kind in ("random-hadamard", "random-matrix"):
        assert torch.equal(draw(kind, 1), draw(kind, 1))
        assert not torch.equal(draw(kind, 1), draw(kind, 2))
    plain = draw("hadamard", 1)
    assert torch.equal(plain, draw("hadamard", 2))  # deterministic without randomize
    assert not torch.equal(plain, draw("hadamard", 1, randomize=True))


def test_precision_is_the_returned_dtype():
    assert rotation_matrix("hadamard", 8, dtype=torch.float32).dtype == torch.float32


def test_supported_sizes():
    assert all(hadamard_supported(n) for n in (1, 2, 64, 172, 576, 768, 4096, 11008))
    assert not any(hadamard_supported(n) for n in (0, 3, 6, 10, 258))


def test_unsupported_size_points_to_random_matrix():
    with pytest.raises(ValueError, match=r"size 6.*random-matrix"):
        rotation_matrix("hadamard", 6)
    with pytest.raises(ValueError, match="random-hadamard"):
        rotation_matrix("random-hadamard", 10)
    assert rotation_matrix("random-matrix", 6).shape == (6, 6)
    with pytest.raises(ValueError, match="transform_type must be one of"):
        rotation_matrix("walsh", 8)


# ---------------------------------------------------------------- compressed-tensors' table
def test_the_table_holds_the_orders_compressed_tensors_own_construction_accepts():
    """Pins what the known-order table is: the file compressed-tensors' public
    random_hadamard_matrix builds from, so both accept exactly the same sizes."""
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix

    from compressor.modifiers.transform.spinquant.matrices import (
        hadamard_table_path,
        known_hadamard,
        supported_hadamard_orders,
    )

    assert hadamard_table_path() is not None
    assert {12, 20, 28, 36, 172} <= set(supported_hadamard_orders())
    for size in range(4, 400, 4):
        try:
            random_hadamard_matrix(size, torch.float64)
            theirs = True
        except ValueError:
            theirs = False
        assert hadamard_supported(size) == theirs, size
    for order in (12, 172):
        known = known_hadamard(order)
        torch.testing.assert_close(known @ known.T, order * torch.eye(order, dtype=torch.float64))


def test_without_the_table_only_powers_of_two_are_supported(monkeypatch):
    from compressor.modifiers.transform.spinquant import matrices

    monkeypatch.setattr(matrices, "hadamard_table_path", lambda: None)
    matrices.supported_hadamard_orders.cache_clear()
    try:
        assert hadamard_supported(64) and not hadamard_supported(172)
        with pytest.raises(ValueError, match=r"size 12: a Hadamard matrix needs a power of two"):
            rotation_matrix("hadamard", 12)
        assert rotation_matrix("hadamard", 8).shape == (8, 8)
    finally:
        matrices.supported_hadamard_orders.cache_clear()
