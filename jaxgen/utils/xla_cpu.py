"""XLA:CPU compiler flags jaxgen sets for itself at import (before jax creates its CPU client).

`--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA:CPU's default scheduler orders a program for
parallelism at the cost of keeping many buffers alive at once. On the 2-core VM the memory-ordered schedule is
both smaller and faster: RAR-B's random init needs 12 KB of temporaries instead of 936 MB (peak RSS 2.37 -> 1.38
GB), and its f32 train step at batch 4 took 10.9 s instead of 12.7 s with 7.7 instead of 9.7 GB peak RSS
(docs/benchmarks.md). It only changes the order of operations, not their arithmetic.

Nothing is set when XLA_FLAGS already names the flag, or with JAXGEN_XLA_CPU_SCHEDULER=default.
"""
from __future__ import annotations

import os

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
OPT_OUT = "JAXGEN_XLA_CPU_SCHEDULER"


def memory_ordered_scheduler() -> bool:
    """Append the flag above to XLA_FLAGS; True when this call added it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get(OPT_OUT, "") == "default" or SCHEDULER_FLAG in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}=false".strip()
    return True
