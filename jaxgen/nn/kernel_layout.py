"""Out-major Dense kernels for decode loops on XLA:CPU: the same weights, stored (out, in) for the loop's matmuls.

Why: XLA:CPU's dot of a few rows by a cache-resident (in, out) kernel is slow for 12-48 rows; with the kernel
stored (out, in) the same product is 1.3-1.8x faster (twelve 1024 x 1024 kernels, 16 rows: 5.0 -> 3.8 ms; 32
rows: 8.3 -> 5.3 ms). At 4 rows it is the other way round (1.6 vs 2.9 ms), and at hundreds of rows both are
within noise (2-core Intel VM, 2026-12-06). MAR's diffusion head at 64 AR steps runs 12-28 rows per DDPM step
(`MIN_ROWS`). Transposing inside the loop would copy every kernel at every step, and XLA folds a transpose
written next to its dot back into the dot, so the copy is made OUTSIDE the loop and only viewed inside it:

    prepared = to_out_major(params, select)          # once, before the loop
    ... inside the loop body: model.apply({"params": in_major(prepared)}, ...)

`in_major` gives back (in, out) arrays as transposes of the stored copies; XLA folds those transposes into the
dots, which then read the (out, in) copies. The products are equal up to float32 summation order.
Not for weights streamed from memory at a few rows: RAR-B's decode loop (4 rows, 680 MB of block kernels) got
slower (20.3 -> 21.9 s per sample) and held the copies besides the params (peak RSS 1.67 -> 3.16 GB). Up to
`jaxgen.kernels.cpu.MAX_ROWS` rows `Dense` uses jaxgen's own kernel on the in-major params instead (jaxgen.kernels);
on out-major views it uses `jaxgen.kernels.cpu.matmul_wt` (`out_major_views`).
Only XLA:CPU gets the copies (`wanted`); other backends lay out their operands themselves.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, NamedTuple, Tuple

import jax
import jax.numpy as jnp

Path = Tuple[str, ...]

# Fewest rows per matmul at which out-major kernels are faster (cache-resident 1024 x 1024 kernels, see above).
MIN_ROWS = 12


class OutMajor(NamedTuple):
    """A Dense kernel (in, out) stored as its transpose (out, in)."""

    transposed: jax.Array


def _is_out_major(x) -> bool:
    return isinstance(x, OutMajor)


def _names(path) -> Path:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def wanted(rows: int) -> bool:
    """Whether a loop multiplying `rows` rows per matmul should read out-major kernels: on XLA:CPU from MIN_ROWS on
    (decided at trace time, like the attention implementation)."""
    return jax.default_backend() == "cpu" and rows >= MIN_ROWS


def dense_kernels(modules: Tuple[str, ...], within: str = "") -> Callable[[Path, Any], bool]:
    """Selector: the 2-D `kernel` params of the modules named in `modules` (below a module named `within`)."""
    def select(path: Path, leaf) -> bool:
        return (len(path) >= 2 and path[-1] == "kernel" and path[-2] in modules and getattr(leaf, "ndim", 0) == 2
                and (not within or within in path[:-2]))
    return select


def to_out_major(params: Any, select: Callable[[Path, Any], bool]) -> Any:
    """params with every selected kernel replaced by OutMajor(kernel.T) (a copy); converted ones are kept."""
    def convert(path, leaf):
        if _is_out_major(leaf) or not select(_names(path), leaf):
            return leaf
        return OutMajor(jnp.transpose(leaf))
    return jax.tree_util.tree_map_with_path(convert, params, is_leaf=_is_out_major)


_tracing = threading.local()


@contextlib.contextmanager
def out_major_views():
    """Trace a loop body that reads `in_major` views inside this: `jaxgen.nn.layers.Dense` then keeps XLA's dot, which
    folds a view's transpose. jaxgen's BLAS and few-row kernels take (in, out) operands, so XLA would copy every
    viewed kernel back at every step (MAR-B's head at 24+ rows: 12 transposed 1024 x 1024 copies per DDPM step)."""
    depth = getattr(_tracing, "depth", 0)
    _tracing.depth = depth + 1
    try:
        yield
    finally:
        _tracing.depth = depth


def tracing_views() -> bool:
    """Whether a body reading out-major views is being traced (`out_major_views`)."""
    return getattr(_tracing, "depth", 0) > 0


def in_major(params: Any) -> Any:
    """The params tree the modules expect: OutMajor leaves viewed as (in, out). Call inside the loop body."""
    return jax.tree_util.tree_map(lambda x: jnp.transpose(x.transposed) if _is_out_major(x) else x, params,
                                  is_leaf=_is_out_major)
