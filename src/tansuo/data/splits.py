"""Seeded splits of a data set into train / validation / test index sets."""

from __future__ import annotations

import math

import numpy as np


def split_sizes(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Sizes for splitting ``n`` items by ``fractions``: rounded, summing to ``n``, none empty if avoidable.

    Each split gets ``floor(n * fraction)``; the items left over go one each to the splits with the largest
    remainders (earlier splits first on ties). Then every split with a positive fraction that came out empty
    takes one item from the largest split, as long as ``n`` has enough items.
    """
    exact = [n * fraction for fraction in fractions]
    sizes = [math.floor(value) for value in exact]
    by_remainder = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    for i, fraction in enumerate(fractions):
        if sizes[i] == 0 and fraction > 0:
            largest = max(range(len(sizes)), key=lambda j: (sizes[j], -j))
            if sizes[largest] > 1:
                sizes[largest] -= 1
                sizes[i] += 1
    return sizes


def split_indices(
    n: int, fractions: tuple[float, ...] = (0.8, 0.1, 0.1), seed: int = 0
) -> tuple[np.ndarray, ...]:
    """Shuffle ``range(n)`` with a seed and cut it into consecutive parts of the given fractions.

    The shuffle is ``numpy.random.default_rng(seed).permutation(n)`` (PCG64), the same on every platform and
    NumPy version that keeps that generator's stream. Sizes come from :func:`split_sizes`.

    Args:
        n: Number of items.
        fractions: Share of each split, each >= 0, summing to 1.
        seed: Seed of the shuffle.

    Returns:
        One int64 index array per fraction; disjoint, together covering ``0..n-1``.

    Raises:
        ValueError: If ``n`` is negative or the fractions are negative or do not sum to 1.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not fractions or any(fraction < 0 for fraction in fractions):
        raise ValueError(f"fractions must be one or more non-negative numbers, got {fractions}")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {fractions} (sum {sum(fractions)})")
    order = np.random.default_rng(seed).permutation(n).astype(np.int64)
    bounds = np.cumsum([0, *split_sizes(n, tuple(fractions))])
    return tuple(order[start:stop] for start, stop in zip(bounds[:-1], bounds[1:], strict=True))
