"""jaxgen.sampling.buckets: optimal padded sizes for per-step work counts; equal chunks within a byte budget."""
import itertools

import numpy as np
import pytest

from jaxgen.sampling.buckets import chunk_within_budget, size_buckets


def _brute_force(counts, max_buckets, cost):
    values = sorted(set(counts))
    best = None
    for b in range(1, max_buckets + 1):
        for rest in itertools.combinations(values[:-1], b - 1):
            sizes = sorted(rest) + [values[-1]]
            total = sum(cost(min(s for s in sizes if s >= c)) for c in counts)
            best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_buckets", [1, 2, 3, 5])
def test_optimal_and_covering(seed, max_buckets):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 40, size=int(rng.integers(1, 25))).tolist()
    cost = lambda n: (n + 3) * (1 + n / 50)  # noqa: E731  (grows with n, like an encoder pass)
    sizes, branch = size_buckets(counts, max_buckets, cost)
    assert list(sizes) == sorted(set(sizes)) and len(sizes) <= max_buckets
    chosen = np.asarray(sizes)[branch]
    assert (chosen >= counts).all() and max(sizes) == max(counts)
    # Each step uses the smallest size covering it, and the total is the brute-force optimum.
    assert all(branch[k] == 0 or sizes[branch[k] - 1] < c for k, c in enumerate(counts))
    assert sum(cost(int(s)) for s in chosen) == pytest.approx(_brute_force(counts, max_buckets, cost))


def test_exact_with_enough_buckets_and_errors():
    counts = [1, 1, 2, 3, 3, 7]
    sizes, branch = size_buckets(counts, 8)
    assert sizes == (1, 2, 3, 7)
    np.testing.assert_array_equal(np.asarray(sizes)[branch], counts)
    with pytest.raises(ValueError, match="max_buckets"):
        size_buckets(counts, 0)
    with pytest.raises(ValueError, match="non-empty"):
        size_buckets([], 2)


def test_chunk_within_budget_is_the_largest_fitting_divisor():
    # RAR-B at batch 2: 256 slots of 1.33 MB modulations each
    per_slot = 3 * 24 * 6 * 768 * 4
    assert chunk_within_budget(256, per_slot, 96 << 20) == 64
    assert chunk_within_budget(256, per_slot, 64 << 20) == 32
    assert chunk_within_budget(100, 10, 999) == 50  # 99 items fit, 50 is the largest divisor of 100 up to 99
    assert chunk_within_budget(7, 10, 69) == 1  # a prime: one item per chunk
    assert chunk_within_budget(9, 10, 5) == 1  # not even one item fits: still 1 (the caller's per-step path)
    assert chunk_within_budget(9, 0, 0) == 9
