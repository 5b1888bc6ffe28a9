"""jaxgen's XLA:CPU kernels (XLA FFI, `cpu.cc`): few-row matmuls and one-query KV-cache attention at the speed of
reading their operands, a many-query attention (forward and backward) that keeps its logits in cache, and large
matmuls through numpy's OpenBLAS. All are used on the CPU backend with one device and float32 operands only.

`matmul` -- why: decode loops multiply a few rows by every weight matrix of the model per step (RAR's KV-cached
decode: 4 rows, 680 MB of RAR-B block kernels per token), so they are bound by reading the weights. XLA:CPU's dot reads them at
11-13 GB/s on the 2-core Intel VM, where a sequential stream runs at ~25 GB/s; the kernel splits the weight rows
into one contiguous part per thread and reads them at ~22 GB/s (a chain of RAR-B-sized f32 kernels at 4 rows,
2026-12-06). Above 8 rows (up to MAX_ROWS: VAR's coarse scales, RAR's adaLN modulations at 48 rows) each thread
takes a block of columns and runs register tiles of 12 rows over L2-sized chunks of it, so the weights still stream
from memory once. Same product up to float32 summation order. `matmul` and `decode_attention` hand their second part to
the kernels' own helper threads, which spin ~200 us after each job before sleeping: a decode step makes ~100 such
calls per token, and waking one of XLA's pool threads for each cost ~15-25 us of a 0.1-0.4 ms call (RAR-B's
sampler: 11.5 -> 10.6 s per batch of 2, alternated in one process, 2026-12-06).

`Dense` calls `matmul` when `wanted(rows, ...)`: the CPU backend with one device, float32 operands, at most
MAX_ROWS rows, and the kernels built. They are compiled from `cpu.cc` on first use with the system C++
compiler (jax ships the FFI headers) into a per-machine cache (`$JAXGEN_CACHE_DIR`, else ~/.cache/jaxgen); without a
compiler, or with JAXGEN_CPU_KERNELS=0, jaxgen keeps XLA's ops (one log line says why). Gradients use plain dots.

`decode_attention` -- a decode step's attention (one query per sequence and head) over a fixed-size KV cache of which
only the first `length` slots are written: XLA attends over every slot with a mask, reading the whole cache; the
kernel reads the written slots only, one (batch, head) pair after another on each thread (`Attention` uses it for
T = 1 with no extra mask, bias or dropout, under the same conditions as `matmul`).

`attention` -- softmax(q k^T * scale) v with at most a per-key mask (MAR's encoder / decoder, VAR's cached scales
and its one-scale teacher-forcing chunks): XLA:CPU writes the (B, N, T, S) logits to memory and reads them back
between its ops (2x torch's SDPA time); the kernel computes the logits of a tile of queries (12 with AVX-512, 6 with
AVX2) as register tiles, takes the softmax in L1 / L2 and multiplies by v, per (batch, head) pair on each thread. Its backward recomputes
the probabilities, so training keeps no (T, S) array per layer (VAR-d16's train step: 7.7 -> 7.0 s, peak RSS
8.6 -> 7.7 GB). `jaxgen.nn.attention.dot_product_attention` dispatches to it. One call also covers a run of
query chunks that each see the keys up to their end (`prefix_chunk_attention`, VAR's block-causal scales), reading
q, k and v in place: per-chunk slices would be copies the gradient keeps (VAR-d16's train step: -0.4 GB).

`matmul_wt` -- the same for kernels stored out-major (N, K) (`jaxgen.nn.kernel_layout`, MAR's diffusion head at
12-28 rows per DDPM step): register tiles of 4 rows x 6 kernel rows along K, each thread streaming its block of
kernel rows once (twelve 1024 x 1024 kernels at 16 rows: 3.8 -> 2.5 ms against XLA's dot on the views).

`group_norm` -- GroupNorm (+ SiLU) at inference in two reads of x and one write (XLA: three reads at ~10 GB/s).

`winograd_conv3` -- the image autoencoders' 3x3 convolutions (stride 1, padding 1) at 32 x 32 pixels and up: XLA:CPU
runs them at ~300 GFLOP/s of direct-conv work, Winograd's F(4x4, 3x3) needs 36 instead of 144 multiplications per 4 x 4
outputs; one kernel transforms a block of tiles, multiplies with the register tiles and transforms back in cache (2 x
256 x 256 x 160 -> 160: ~200 -> ~80 ms; VAR-d16's VQVAE decode 2.6 -> 1.5 s). `Conv` calls it where
`wanted_winograd`; JAXGEN_CPU_WINOGRAD=0 keeps XLA's conv. With `upsample` it reads the nearest x2 upsampling of x in
place (the decoders' Upsample blocks). Values ~1e-5 of the output's scale from the direct conv's; gradients are XLA's.

`gemm` -- XLA:CPU's dots reach 285-320 GFLOP/s on the transformer-sized products of this VM where OpenBLAS (the
copy numpy's wheel bundles, 64-bit integers) reaches 320-345: `Dense` calls `gemm` from BLAS_MIN_ROWS rows (except
XLA_DOT_ROWS on large weights, where XLA's dot is the faster), each
thread of XLA's pool running one single-threaded sgemm on its block (BLAS starts no threads of its own); the
gradients are sgemms too. Without numpy's OpenBLAS, or with JAXGEN_CPU_BLAS=0, XLA's dots stay.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# `matmul` up to 8 rows streams the kernel once (decode steps); above, it runs register tiles of 12 rows over chunks
# of the kernel kept in L2, so the kernel still streams once: at 12-48 rows 1.3-2.5x both OpenBLAS's sgemm and XLA's
# dot on transformer-sized weights (768 x 4608 at 48 rows: 1.9 against 3.0 ms; 1024 x 4096 at 16 rows: 1.1 against
# 2.3 ms), at 64 rows even with XLA's (2-core Intel VM, 2026-12-07). MAR's head at 12+ rows reads out-major copies
# through `matmul_wt` instead (jaxgen.nn.kernel_layout).
MAX_ROWS = 63
TARGETS = {"jaxgen_cpu_gemv": "JaxgenCpuGemv", "jaxgen_cpu_decode_attention": "JaxgenCpuDecodeAttention",
           "jaxgen_cpu_attention": "JaxgenCpuAttention", "jaxgen_cpu_attention_backward": "JaxgenCpuAttentionBackward",
           "jaxgen_cpu_blas_gemm": "JaxgenCpuBlasGemm", "jaxgen_cpu_top_k_values": "JaxgenCpuTopKValues",
           "jaxgen_cpu_group_norm": "JaxgenCpuGroupNorm", "jaxgen_cpu_gemm_wt": "JaxgenCpuGemmWt",
           "jaxgen_cpu_winograd_conv3": "JaxgenCpuWinogradConv3"}
(GEMV, DECODE_ATTENTION, ATTENTION, ATTENTION_BACKWARD, BLAS_GEMM, TOP_K_VALUES, GROUP_NORM, GEMM_WT,
 WINOGRAD_CONV3) = TARGETS
BLAS_OPT_OUT = "JAXGEN_CPU_BLAS"
BLAS_MIN_ROWS = MAX_ROWS + 1  # below, `matmul` streams the kernel once and leads
# Between these rows XLA:CPU's own dot beats the split sgemm on transformer-sized weights (at least XLA_DOT_MIN_SIZE
# elements: 768 x 768 and up): OpenBLAS packs each thread's half of the weights for a few hundred rows only. A chain
# of eight products, 2-core Intel VM (2026-12-07): at 64-384 rows XLA 200-350 GFLOP/s against BLAS 160-310 (e.g.
# 144 x 1024 x 4096: 289 against 254); at 24-48 rows and from ~400 rows BLAS leads (1024 x 1024 x 4096: 364 / 328).
XLA_DOT_ROWS = (64, 400)
WT_ROWS = (9, 48)  # `matmul_wt` (out-major kernels): the rows measured
XLA_DOT_MIN_SIZE = 1 << 19
# CBLAS sgemm with 64-bit integers, and OpenBLAS's per-thread thread count, as numpy's bundled OpenBLAS exports them
BLAS_SYMBOLS = (("scipy_cblas_sgemm64_", "cblas_sgemm64_"), ("openblas_set_num_threads_local",))
OPT_OUT = "JAXGEN_CPU_KERNELS"
WINOGRAD_OPT_OUT = "JAXGEN_CPU_WINOGRAD"
WINOGRAD_MIN_PIXELS = 32 * 32
# below, the transforms run off the SIMD width and the products are too thin: the tiny MaskGIT-VQGAN's 8-channel convs
# at 32 x 32 trained ~7 % slower (2-core Intel VM, 2026-12-08)
WINOGRAD_MIN_IN_CHANNELS = 32
# extra compiler flags after -march=native, e.g. "-mno-avx512f": a build for a narrower instruction set than this
# CPU's (a cache shared across machines; the tests build the other SIMD widths this way)
EXTRA_FLAGS = "JAXGEN_CPU_KERNELS_FLAGS"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu.cc")

_lock = threading.Lock()
_state: dict = {}  # "ok": bool once decided, "why": reason when not


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def cache_dir() -> str:
    root = os.environ.get("JAXGEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxgen")
    return os.path.join(root, "kernels")


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _extra_flags() -> list:
    return os.environ.get(EXTRA_FLAGS, "").split()


def library_path(compiler: str) -> str:
    """Where the build for this source, jaxlib, compiler, extra flags and CPU lives (built with -march=native, so per
    CPU)."""
    import jaxlib

    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + jaxlib.__version__.encode() + compiler.encode() + _cpu_flags().encode()
                             + " ".join(_extra_flags()).encode())
    return os.path.join(cache_dir(), f"cpu_{key.hexdigest()[:16]}.so")


def build(compiler: str) -> str:
    """Compile cpu.cc once per machine (atomic rename: concurrent processes never load a half-written file)."""
    path = library_path(compiler)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    cmd = [compiler, "-O3", "-march=native", *_extra_flags(), "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC",
           "-pthread", f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _numpy_openblas() -> str:
    """Path of the OpenBLAS that numpy's wheel bundles (numpy.libs/libscipy_openblas64_*), or ''."""
    import glob

    site = os.path.dirname(os.path.dirname(os.path.abspath(np.__file__)))
    for pattern in ("numpy.libs/libscipy_openblas64_*.so*", "scipy_openblas64/lib/libscipy_openblas64_*.so*"):
        found = sorted(glob.glob(os.path.join(site, pattern)))
        if found:
            return found[0]
    return ""


def _register_blas(lib) -> None:
    """Hand numpy's OpenBLAS sgemm to the kernels (state 'blas'); a log line says why not where it cannot."""
    why = ""
    if os.environ.get(BLAS_OPT_OUT, "") == "0":
        why = f"{BLAS_OPT_OUT}=0"
    elif not (path := _numpy_openblas()):
        why = "numpy bundles no OpenBLAS here"
    else:
        blas = ctypes.CDLL(path)
        found = [next((getattr(blas, n) for n in names if hasattr(blas, n)), None) for names in BLAS_SYMBOLS]
        if None in found:
            why = f"{os.path.basename(path)} lacks {BLAS_SYMBOLS[found.index(None)][0]}"
        else:
            lib.JaxgenSetBlas(ctypes.cast(found[0], ctypes.c_void_p), ctypes.cast(found[1], ctypes.c_void_p))
            _state["blas"] = True
            return
    _state.update(blas=False, blas_why=why)
    logging.info("jaxgen: no BLAS for large CPU matmuls, XLA's dots instead (%s)", why)


def _register() -> None:
    if os.environ.get(OPT_OUT, "") == "0":
        raise RuntimeError(f"{OPT_OUT}=0")
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++ / g++ / clang++ or $CXX) on PATH")
    lib = ctypes.cdll.LoadLibrary(build(compiler))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    _register_blas(lib)


def available() -> bool:
    """Whether the kernels are built and registered (decided once per process; never raises)."""
    with _lock:
        if "ok" not in _state:
            try:
                _register()
                _state["ok"] = True
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                lines = str(getattr(e, "stderr", "") or e).strip().splitlines()
                why = next((line for line in lines if "error" in line), lines[-1] if lines else type(e).__name__)
                _state.update(ok=False, why=why)
                logging.info("jaxgen: no CPU kernels, XLA's ops instead (%s)", why)
        return _state["ok"]


def _cpu_f32(*dtypes) -> bool:
    return (all(jnp.dtype(d) == jnp.float32 for d in dtypes) and jax.default_backend() == "cpu"
            and jax.device_count() == 1)


def wanted(rows: int, x_dtype, w_dtype) -> bool:
    """Whether a (rows, K) x (K, N) product should use `matmul` (decided at trace time)."""
    return rows <= MAX_ROWS and _cpu_f32(x_dtype, w_dtype) and available()


def wanted_wt(rows: int, x_dtype, w_dtype) -> bool:
    """Whether a (rows, K) x (K, N) product whose kernel is stored out-major (N, K) should use `matmul_wt`."""
    return WT_ROWS[0] <= rows <= WT_ROWS[1] and _cpu_f32(x_dtype, w_dtype) and available()


def wanted_gemm(rows: int, x_dtype, w_dtype, w_size: int = 0) -> bool:
    """Whether a (rows, K) x (K, N) product should use `gemm` (BLAS; decided at trace time); w_size = K * N."""
    xla_dot_faster = XLA_DOT_ROWS[0] <= rows < XLA_DOT_ROWS[1] and w_size >= XLA_DOT_MIN_SIZE
    return (rows >= BLAS_MIN_ROWS and not xla_dot_faster and _cpu_f32(x_dtype, w_dtype) and available()
            and _state.get("blas", False))


def wanted_attention(q_dtype, k_dtype, v_dtype) -> bool:
    """Whether an attention the kernels cover (`attention`: at most a per-key mask; `decode_attention`: one query
    over a KV cache) should use them (decided at trace time)."""
    return _cpu_f32(q_dtype, k_dtype, v_dtype) and available()


def wanted_group_norm(dtype) -> bool:
    """Whether `group_norm` should replace XLA's GroupNorm (+ SiLU) at inference (decided at trace time)."""
    return _cpu_f32(dtype) and available()


def wanted_winograd(x_shape, kernel_shape, dtype, upsample: bool = False) -> bool:
    """Whether a 3x3, stride-1, padding-1 conv of x (B, H, W, C) (upsampled x2 first when `upsample`) should run as
    `winograd_conv3` (decided at trace time): the conv's H and W divisible by 4 with at least WINOGRAD_MIN_PIXELS,
    at least WINOGRAD_MIN_IN_CHANNELS input channels, float32, BLAS available, not opted out (JAXGEN_CPU_WINOGRAD=0)."""
    h, w = (x_shape[1] * 2, x_shape[2] * 2) if upsample else tuple(x_shape[1:3])
    return (tuple(kernel_shape[:2]) == (3, 3) and h % 4 == 0 and w % 4 == 0 and h * w >= WINOGRAD_MIN_PIXELS
            and kernel_shape[2] >= WINOGRAD_MIN_IN_CHANNELS
            and os.environ.get(WINOGRAD_OPT_OUT, "") != "0" and _cpu_f32(dtype) and available()
            and _state.get("blas", False))


def wanted_top_k(dtype) -> bool:
    """Whether `top_k_values` should replace lax.top_k's values (decided at trace time)."""
    return _cpu_f32(dtype) and available()


def top_k_values(x: jax.Array, k: int) -> jax.Array:
    """lax.top_k(x, k)[0] (the k largest of each row of x (..., V), descending) by a per-row selection: VAR-d16's
    1,360 rows x 4,096 logits at k = 900 in ~0.04 s against lax.top_k's ~0.25 s. Call only where `wanted_top_k`."""
    _require()
    out = jax.ShapeDtypeStruct(x.shape[:-1] + (int(k),), jnp.float32)
    return jax.ffi.ffi_call(TOP_K_VALUES, out, vmap_method="broadcast_all")(x)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float,
               silu: bool = False) -> jax.Array:
    """torch's GroupNorm over x (B, ..., C) (channels last), then optionally torch's SiLU, in one kernel that reads x
    twice and writes once (XLA:CPU: three reads at ~10 GB/s; 2 x 256 x 256 x 160 + SiLU 33 -> ~10 ms). Forward only:
    for inference (`jaxgen.nn.conv.GroupNorm` uses it when deterministic). Call only where `wanted_group_norm`."""
    _require()
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jax.ffi.ffi_call(GROUP_NORM, out, vmap_method="sequential")(
        x, scale.astype(jnp.float32), bias.astype(jnp.float32), eps=np.float32(eps), groups=np.int64(groups),
        silu=bool(silu))


def _require():
    if not available():
        raise RuntimeError(f"the CPU kernels are not available: {_state['why']}")


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, length, scale: float) -> jax.Array:
    """softmax(q k[:, :, :length]^T * scale) v[:, :, :length]: q (B, 1, N, H), k, v (B, N, S, H) (`KVCache`),
    length a traced int (1 <= length <= S) -> (B, 1, N, H) float32. Call only where `wanted_attention`."""
    _require()
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.ffi.ffi_call(DECODE_ATTENTION, out, vmap_method="sequential")(
        q, k, v, jnp.asarray(length, jnp.int32), scale=np.float32(scale))


def _window_attrs(window):
    q_begin, q_ends, k_ends = window
    return dict(q_begin=np.int64(q_begin), q_ends=np.asarray(q_ends, np.int64), k_ends=np.asarray(k_ends, np.int64))


def _attention(q, k, v, keep, scale, window):
    rows = window[1][-1] - window[0]
    out = jax.ShapeDtypeStruct((q.shape[0], rows) + q.shape[2:], jnp.float32)
    return jax.ffi.ffi_call(ATTENTION, out, vmap_method="sequential")(q, k, v, keep, scale=np.float32(scale),
                                                                      **_window_attrs(window))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention_vjp(q, k, v, keep, scale, window):
    return _attention(q, k, v, keep, scale, window)


def _attention_fwd(q, k, v, keep, scale, window):
    out = _attention(q, k, v, keep, scale, window)
    return out, (q, k, v, keep, out)


def _attention_bwd(scale, window, saved, g):
    q, k, v, keep, out = saved
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(ATTENTION_BACKWARD, shapes, vmap_method="sequential")(
        q, k, v, keep, out, g.astype(jnp.float32), scale=np.float32(scale), **_window_attrs(window))
    return dq, dk, dv, jnp.zeros_like(keep)


_attention_vjp.defvjp(_attention_fwd, _attention_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, keep: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v per (batch, head): q (B, T, N, H), k, v (B, S, N, H), keep (B, S) (False: no key;
    masked logits at the lowest finite float, as in `jaxgen.nn.attention`) -> (B, T, N, H) float32, differentiable
    (the backward kernel recomputes the probabilities: nothing of size (T, S) is kept for it). Call only where
    `wanted_attention`."""
    _require()
    window = (0, (q.shape[1],), (k.shape[1],))
    return _attention_vjp(q, k, v, jnp.asarray(keep, jnp.float32), float(scale), window)


def prefix_chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunks, scale: float) -> jax.Array:
    """`attention` of self-attention for the queries of static, contiguous `chunks` ((a, b), ...; each a = the
    previous b), those of [a, b) seeing keys [0, b) only (VAR's block-causal scales): q, k, v (B, T, N, H) -> the
    chunks' rows (B, last b - first a, N, H) float32. One kernel call reads q, k and v in place: no slices per chunk,
    whose copies the gradient would keep (VAR-d16's train step: -0.4 GB at its peak, docs/benchmarks.md). Call only
    where `wanted_attention`."""
    _require()
    if any(prev[1] != nxt[0] for prev, nxt in zip(chunks, chunks[1:])) or chunks[0][0] >= chunks[0][1]:
        raise ValueError(f"prefix_chunk_attention needs contiguous, non-empty chunks, got {tuple(chunks)}")
    ends = tuple(int(b) for _, b in chunks)
    keep = jnp.ones((q.shape[0], k.shape[1]), jnp.float32)
    return _attention_vjp(q, k, v, keep, float(scale), (int(chunks[0][0]), ends, ends))


def _blas(x, w, transpose_x=False, transpose_w=False):
    m = x.shape[1] if transpose_x else x.shape[0]
    n = w.shape[0] if transpose_w else w.shape[1]
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return jax.ffi.ffi_call(BLAS_GEMM, out, vmap_method="sequential")(
        x, w, transpose_x=transpose_x, transpose_w=transpose_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gemm(x, w, w_out_major: bool):
    return _blas(x, w, transpose_w=w_out_major)


def _gemm_fwd(x, w, w_out_major):
    return _blas(x, w, transpose_w=w_out_major), (x, w)


def _gemm_bwd(w_out_major, saved, g):
    x, w = saved
    if w_out_major:  # w is (N, K): dx = g @ w, dw = g^T @ x
        return _blas(g, w), _blas(g, x, transpose_x=True)
    return _blas(g, w, transpose_w=True), _blas(x, g, transpose_x=True)


_gemm.defvjp(_gemm_fwd, _gemm_bwd)


def gemm(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (M, K) @ w (K, N) -> (M, N) float32 through BLAS (call only where `wanted_gemm`); its gradients too."""
    return _gemm(x, w, False)


def gemm_wt(x: jax.Array, wt: jax.Array) -> jax.Array:
    """x (M, K) @ wt.T for wt (N, K) stored out-major -> (M, N) float32 through BLAS, which reads wt transposed in
    place (call only where `wanted_gemm`): `gemm` on the (in, out) view would have XLA copy it back every call."""
    return _gemm(x, wt, True)


@jax.custom_vjp
def matmul_wt(x: jax.Array, wt: jax.Array) -> jax.Array:
    """x (M, K) @ wt.T for wt (N, K) stored out-major -> (M, N) float32 (call only where `wanted_wt`); gradients
    are plain dots."""
    _require()
    out = jax.ShapeDtypeStruct((x.shape[0], wt.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(GEMM_WT, out, vmap_method="sequential")(x, wt)


def _matmul_wt_fwd(x, wt):
    return matmul_wt(x, wt), (x, wt)


def _matmul_wt_bwd(saved, g):
    x, wt = saved
    return g @ wt, g.T @ x


matmul_wt.defvjp(_matmul_wt_fwd, _matmul_wt_bwd)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (M, K) @ w (K, N) -> (M, N) float32 through the kernel (call only where `wanted`)."""
    _require()
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(GEMV, out, vmap_method="sequential")(x, w)


def _fwd(x, w):
    return matmul(x, w), (x, w)


def _bwd(saved, g):
    x, w = saved
    return jnp.dot(g, w.T), jnp.dot(x.T, g)


matmul.defvjp(_fwd, _bwd)


def _winograd_filter_rows(k0, k1, k2):
    """G (k0, k1, k2) along one axis: Winograd F(4, 3)'s filter transform (Lavin & Gray 2016), G's 6 rows being
    (1/4, 0, 0), -(1, 1, 1)/6, -(1, -1, 1)/6, (1/24, 1/12, 1/6), (1/24, -1/12, 1/6), (0, 0, 1)."""
    return [k0 / 4, -(k0 + k1 + k2) / 6, -(k0 - k1 + k2) / 6, k0 / 24 + k1 / 12 + k2 / 6, k0 / 24 - k1 / 12 + k2 / 6,
            k2]


def winograd_filters(kernel: jax.Array) -> jax.Array:
    """(3, 3, C, O) -> U = G k G^T as (36, C, O) float32, row-major over the 6 x 6 positions. Element-wise
    (an einsum with G took 10x as long: 15 against 1.6 ms at 320 x 320 channels)."""
    k = kernel.astype(jnp.float32)
    rows = _winograd_filter_rows(k[0], k[1], k[2])  # each (3, C, O): kernel columns
    u = [col for row in rows for col in _winograd_filter_rows(row[0], row[1], row[2])]
    return jnp.stack(u)


def _conv3_reference(x, kernel, upsample):
    if upsample:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _winograd_conv3(x, kernel, bias, upsample):
    scale = 2 if upsample else 1
    out = jax.ShapeDtypeStruct((x.shape[0], x.shape[1] * scale, x.shape[2] * scale, kernel.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(WINOGRAD_CONV3, out, vmap_method="sequential")(x, winograd_filters(kernel), bias,
                                                                           upsample=bool(upsample))


def _winograd_fwd(x, kernel, bias, upsample):
    return _winograd_conv3(x, kernel, bias, upsample), (x, kernel)


def _winograd_bwd(upsample, saved, g):
    x, kernel = saved
    _, vjp = jax.vjp(lambda x, k: _conv3_reference(x, k, upsample), x, kernel)
    dx, dkernel = vjp(g)
    return dx, dkernel, g.sum(axis=(0, 1, 2))


_winograd_conv3.defvjp(_winograd_fwd, _winograd_bwd)


def winograd_conv3(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array] = None,
                   upsample: bool = False) -> jax.Array:
    """conv3x3(x, kernel, stride 1, zero padding 1) + bias for x (B, H, W, C) NHWC, kernel (3, 3, C, O), float32, by
    Winograd's F(4x4, 3x3) in one kernel (call only where `wanted_winograd`); with `upsample`, of x upsampled x2
    (nearest) first, read in place. Gradients: XLA's conv."""
    _require()
    bias = jnp.zeros(kernel.shape[-1:], jnp.float32) if bias is None else bias.astype(jnp.float32)
    return _winograd_conv3(x.astype(jnp.float32), kernel.astype(jnp.float32), bias, bool(upsample))
