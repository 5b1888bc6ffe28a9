"""Size buckets: static shapes for a per-step work size that varies along a decode loop.

A sampler whose step k needs `counts[k]` rows (MAR: visible tokens for the encoder, revealed tokens for the diffusion
head) cannot use a dynamic shape inside one compiled loop. It compiles a few branches instead, each padded to one
bucket size, and `lax.switch`es to the step's bucket (only the taken branch runs). `size_buckets` picks at most
`max_buckets` sizes minimising the summed cost of the padded steps; with as many buckets as distinct counts it is
exact (every step runs exactly its count).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import numpy as np


def size_buckets(counts: Sequence[int], max_buckets: int,
                 cost: Optional[Callable[[int], float]] = None) -> Tuple[Tuple[int, ...], np.ndarray]:
    """-> (sizes ascending, branch[k] = index of the smallest size >= counts[k]), optimal for sum_k cost(size).

    `cost(n)` is the price of one step run at size n (default n); it must grow with n. Dynamic programming over the
    sorted distinct counts (every optimal size is one of them): O(distinct^2 * max_buckets).
    """
    counts = np.asarray(counts, np.int64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {counts.shape}")
    if max_buckets < 1:
        raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
    cost = cost or float
    values, freq = np.unique(counts, return_counts=True)
    m = len(values)
    buckets = min(int(max_buckets), m)
    price = np.array([cost(int(v)) for v in values], np.float64)
    cum = np.concatenate([[0], np.cumsum(freq)])  # steps with value index < j: cum[j]
    inf = float("inf")
    # best[b][j]: cheapest cover of values[:j] with b sizes, the last one values[j-1]; arg[b][j]: previous cut.
    best = np.full((buckets + 1, m + 1), inf)
    arg = np.zeros((buckets + 1, m + 1), np.int64)
    best[0][0] = 0.0
    for b in range(1, buckets + 1):
        for j in range(1, m + 1):
            for i in range(b - 1, j):
                c = best[b - 1][i] + (cum[j] - cum[i]) * price[j - 1]
                if c < best[b][j]:
                    best[b][j], arg[b][j] = c, i
    b = int(np.argmin(best[:, m]))
    sizes, j = [], m
    while b > 0:
        sizes.append(int(values[j - 1]))
        j, b = int(arg[b][j]), b - 1
    sizes = tuple(sorted(sizes))
    branch = np.searchsorted(np.asarray(sizes), counts, side="left").astype(np.int32)
    return sizes, branch


def chunk_within_budget(n: int, item_bytes: int, budget_bytes: int) -> int:
    """The largest divisor d of n whose d items fit in budget_bytes (d * item_bytes <= budget_bytes), at least 1.

    For loops that precompute per-item tables a chunk at a time (adaLN modulations of several DDPM steps or
    decode slots): equal chunks keep one static shape, and the budget bounds the memory they hold.
    """
    fits = [d for d in range(1, int(n) + 1) if n % d == 0 and d * int(item_bytes) <= int(budget_bytes)]
    return max(fits, default=1)
