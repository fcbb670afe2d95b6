"""Seeded train / validation / test splits."""

from __future__ import annotations

import numpy as np
import pytest

from tansuo.data import split_indices, split_sizes


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 101, 1797])
def test_split_indices_disjoint_and_covering(n: int) -> None:
    parts = split_indices(n, (0.8, 0.1, 0.1), seed=0)
    assert len(parts) == 3
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(n))  # disjoint and covering
    assert all(part.dtype == np.int64 for part in parts)
    if n >= 3:
        assert all(len(part) > 0 for part in parts)


def test_split_indices_deterministic() -> None:
    first = split_indices(50, (0.5, 0.5), seed=7)
    second = split_indices(50, (0.5, 0.5), seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    other = split_indices(50, (0.5, 0.5), seed=8)
    assert not np.array_equal(first[0], other[0])
    # Pinned: the PCG64 stream of default_rng(0) is the same on every platform.
    np.testing.assert_array_equal(
        np.concatenate(split_indices(10, (0.8, 0.2), seed=0)), [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]
    )


def test_split_sizes() -> None:
    assert split_sizes(1797, (0.8, 0.1, 0.1)) == [1437, 180, 180]
    assert split_sizes(10, (0.8, 0.1, 0.1)) == [8, 1, 1]
    assert split_sizes(3, (0.8, 0.1, 0.1)) == [1, 1, 1]  # every split non-empty when n allows
    assert split_sizes(2, (0.8, 0.1, 0.1)) == [1, 1, 0]
    assert split_sizes(7, (1 / 3, 1 / 3, 1 / 3)) == [3, 2, 2]
    assert split_sizes(5, (1.0, 0.0)) == [5, 0]
    for n in range(0, 40):
        assert sum(split_sizes(n, (0.7, 0.2, 0.1))) == n


def test_split_indices_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        split_indices(10, (0.8, 0.1))
    with pytest.raises(ValueError, match="non-negative"):
        split_indices(10, (1.2, -0.2))
