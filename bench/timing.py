"""Timing helper shared by the bench scripts."""
from __future__ import annotations

import time


def best_of(fn, args, reps: int) -> float:
    """Seconds of the fastest of `reps` calls fn(*args) after one untimed call (compilation, first touch)."""
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best
