"""Host allocator settings for XLA:CPU: keep freed memory in the process instead of handing it back to the kernel.

Why: an XLA:CPU train step allocates and frees multi-GB temporaries every step. With glibc's defaults those come
from fresh mmaps (and per-thread arenas that trim), so every step page-faults them in again: RAR-B at batch 4 took
1.28 million minor faults (5 GB) and ~5 s of kernel time per step on the 2-core VM, whose balloon driver also
reports freed pages to the host (re-touching them ~2 us/KB). With one arena, no mmap for large blocks and no trimming
the same step has no faults: 14.1 -> 10.2 s (docs/benchmarks.md). The cost: the process keeps its peak heap.

`keep_freed_memory()` applies this through glibc's mallopt at start-up (before the XLA thread pools exist), the
same as the environment MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e12. It does nothing on
non-glibc systems, when the user set MALLOC_* variables other than exactly those three, or with
JAXGEN_HOST_MALLOC=system.

`release_free_memory()` hands the free pages inside the heap back once, at a sampling job's phase boundaries (after
compiling, after loading weights, after the first batch): glibc's malloc_trim(0) returns every whole free page, not
only the top.
Why: with no trimming, XLA's compile-time working memory (~650 MB for VAR-d16's sampler) stays resident as holes
too scattered for the weights to reuse, so the weights land above it and the peak carries both: VAR-d16 sampling
3.03 -> 2.61-2.66 GB (docs/benchmarks.md). Steady-state loops keep their memory: the pages come back once, on
their next use, but as 4 KB pages where they had been 2 MB ones. Training does not trim (its per-step temporaries
would lose their 2 MB pages; an A/B on the tiny tokenizer step was inside this VM's noise either way).

`map_large_blocks()` serves blocks of 32 MB and more from their own mappings from then on (glibc's mmap threshold
at its ceiling), handed back to the kernel when freed; a sampling job switches to it once compiled (`Sampler.
precompile`), before the weights arrive. Why: a sampler's call allocates one large temporary buffer (RAR-B: 241 MB,
its KV cache and modulations) and frees it after; on the heap the next call could find the old hole split by small
blocks and place it anew, so the peak moved by 0.1-0.3 GB between runs of the same code (1.70-1.91 GB); mapped
afresh each call, it came out at 1.70 GB in every run (docs/benchmarks.md), no slower (the pages fault in once per
call, 2 MB at a time with the huge-page tunable). Training keeps its heap: its multi-GB temporaries every step are
what the settings above exist for.

`restart_with_huge_pages()` re-executes the process once with glibc's tunable `glibc.malloc.hugetlb=1` (glibc >=
2.35: the heap is madvised for transparent 2 MB pages as it grows; glibc reads tunables only at start-up, hence the
re-exec). Why: sampling at small batch streams every weight (and the KV cache) once per token, and on 4 KB pages
the TLB misses of that stream cost RAR-B's sampler ~10 % (12.0 -> 10.8 s per batch of 2) and VAR-d16's ~5 %
(docs/benchmarks.md). `jaxgen.main` calls it first thing; the same opt-out, JAXGEN_HOST_MALLOC=system, or a
GLIBC_TUNABLES that already names the tunable, leaves the process as it is.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import sys

# glibc malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
LARGE_BLOCK_BYTES = 32 << 20  # the highest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)

SETTINGS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1000000000000"}
OPT_OUT = "JAXGEN_HOST_MALLOC"
HUGE_PAGES = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc(symbol: str, argtypes):
    """glibc's function `symbol` in this process (argument types set), or None off Linux / glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = getattr(ctypes.CDLL(None), symbol)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    return fn


def _opted_out() -> bool:
    """The user chose the allocator: JAXGEN_HOST_MALLOC=system, or MALLOC_* variables other than SETTINGS. The
    settings themselves in the environment (what bench/vs_official.py gives both sides) are jaxgen's choice, not
    another one: the phase-boundary steps below still apply (without `map_large_blocks` there, RAR-B sampling's
    peak grew call by call in some processes: 1.59 -> 1.77 -> 1.93 GB over four calls, docs/benchmarks.md)."""
    if os.environ.get(OPT_OUT, "") == "system":
        return True
    chosen = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    return bool(chosen) and chosen != SETTINGS


def keep_freed_memory() -> bool:
    """Apply the settings above to this process; True when applied. Call before jax creates its CPU client."""
    if _opted_out():
        return False
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    # mallopt takes an int; glibc stores the trim threshold as size_t, so -1 is SIZE_MAX: never trim (2**31 - 1
    # would not do: the RAR-B step frees more than 2 GB at the top of the heap)
    ok = [mallopt(M_ARENA_MAX, 1), mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, -1)]
    return all(r == 1 for r in ok)


def map_large_blocks() -> bool:
    """From now on serve blocks of LARGE_BLOCK_BYTES or more from their own mappings, unmapped when freed (see the
    module); True when applied. Same opt-outs as `keep_freed_memory`."""
    mallopt = None if _opted_out() else _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    return mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES) == 1 and mallopt(M_MMAP_MAX, 1 << 30) == 1


def release_free_memory() -> bool:
    """Return the heap's free pages to the kernel now (glibc malloc_trim(0)); True when some were. A no-op elsewhere.
    Garbage held only by reference cycles (a jitted program's, e.g. a random init's: ~280 MB for RAR-B) is collected
    first, so its memory is among what goes back."""
    gc.collect()
    trim = _glibc("malloc_trim", [ctypes.c_size_t])
    return bool(trim(0)) if trim is not None else False


def huge_pages_env(environ=None):
    """`environ` (default os.environ) with glibc's huge-page tunable added to GLIBC_TUNABLES, or None where it does
    not apply: opted out, set already (to any value: the user's choice wins), not glibc >= 2.35 on Linux, or the
    kernel's transparent huge pages off ('never')."""
    environ = dict(os.environ if environ is None else environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get(OPT_OUT, "") == "system" or HUGE_PAGES in tunables:
        return None
    libc, version = platform.libc_ver()
    if platform.system() != "Linux" or libc != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35):
        return None
    try:
        with open(THP_MODE) as f:
            if "[never]" in f.read():
                return None
    except OSError:
        return None
    environ["GLIBC_TUNABLES"] = ":".join(t for t in (tunables, f"{HUGE_PAGES}=1") if t)
    return environ


def restart_with_huge_pages() -> None:
    """Re-execute this process (same interpreter and command line: `sys.orig_argv`) with `huge_pages_env()`; returns
    without doing anything where that is None. Call it before any thread or file of the process matters (first
    thing in a CLI): nothing before it survives."""
    env = huge_pages_env()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
