"""Host allocator settings for XLA:CPU: keep freed memory in the process instead of handing it back to the kernel.

Why: an XLA:CPU train step allocates and frees multi-GB temporaries every step. With glibc's defaults those come
from fresh mmaps (and per-thread arenas that trim), so every step page-faults them in again: RAR-B at batch 4 took
1.28 million minor faults (5 GB) and ~5 s of kernel time per step on the 2-core VM, whose balloon driver also
reports freed pages to the host (re-touching them ~2 us/KB). With one arena, no mmap for large blocks and no trimming
the same step has no faults: 14.1 -> 10.2 s (docs/benchmarks.md). The cost: the process keeps its peak heap.

`keep_freed_memory()` applies this through glibc's mallopt at start-up (before the XLA thread pools exist), the
same as the environment MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e12. It does nothing on
non-glibc systems, when the user set any MALLOC_* variable, or with JAXGEN_HOST_MALLOC=system.
"""
from __future__ import annotations

import ctypes
import os
import platform

# glibc malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1000000000000"}
OPT_OUT = "JAXGEN_HOST_MALLOC"


def keep_freed_memory() -> bool:
    """Apply the settings above to this process; True when applied. Call before jax creates its CPU client."""
    if os.environ.get(OPT_OUT, "") == "system" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mallopt takes an int; glibc stores the trim threshold as size_t, so -1 is SIZE_MAX: never trim (2**31 - 1
    # would not do: the RAR-B step frees more than 2 GB at the top of the heap)
    ok = [mallopt(M_ARENA_MAX, 1), mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, -1)]
    return all(r == 1 for r in ok)
