"""Exact torch-equivalent image resizes as separable matrices.

`jax.image.resize` matches neither torch's bicubic (a = -0.75, unclamped source coordinate, border-clamped taps) nor
torch's 'area' mode (adaptive average pooling with overlapping windows), and VAR's token pyramid depends on both
bit-for-bit in spirit (indices must match exactly). So each 1-D resize is a (out, in) matrix built once in numpy with
torch's own float32 arithmetic, and a 2-D resize is two matmuls. Sizes are static, so the matrices are constants.
"""
from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

_F32 = np.float32


def _cubic1(x, a):
    # |x| <= 1 branch of the cubic convolution kernel (torch cubic_convolution1)
    return ((a + _F32(2)) * x - (a + _F32(3))) * x * x + _F32(1)


def _cubic2(x, a):
    # 1 < |x| < 2 branch (torch cubic_convolution2)
    return ((a * x - _F32(5) * a) * x + _F32(8) * a) * x - _F32(4) * a


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """(n_out, n_in) float32 matrix of torch `F.interpolate(mode='bicubic', align_corners=False)` along one axis.

    As torch computes it: scale = in/out, src = scale*(i+0.5)-0.5 (NOT clamped at 0), taps floor(src)-1 .. floor(src)+2
    clamped to the border (clamped taps accumulate onto the edge pixel). Equal sizes give the identity (torch copies).
    """
    if n_in == n_out:
        return np.eye(n_in, dtype=_F32)
    a = _F32(a)
    scale = _F32(n_in) / _F32(n_out)
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        src = scale * (_F32(i) + _F32(0.5)) - _F32(0.5)
        x0 = int(np.floor(src))
        t = _F32(src - _F32(x0))
        w = (_cubic2(t + _F32(1), a), _cubic1(t, a), _cubic1(_F32(1) - t, a), _cubic2(_F32(2) - t, a))
        for k in range(4):
            j = min(max(x0 - 1 + k, 0), n_in - 1)
            m[i, j] += float(w[k])
    return m.astype(_F32)


@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of torch `mode='area'` (= adaptive_avg_pool): row i averages [floor(i*in/out), ceil((i+1)*in/out))."""
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m.astype(_F32)


@functools.lru_cache(maxsize=None)
def nearest_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) selection matrix of torch `mode='nearest'`: src = min(floor(i * (in/out)), in-1) in float32."""
    scale = _F32(n_in) / _F32(n_out)
    m = np.zeros((n_out, n_in), _F32)
    for i in range(n_out):
        m[i, min(int(np.floor(_F32(i) * scale)), n_in - 1)] = 1.0
    return m


@functools.lru_cache(maxsize=None)
def tf1_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of TF1 `resize_bilinear(align_corners=False)` (no half-pixel centres, no antialias), as
    torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` for FID's Inception: src = i * float32(in / out),
    lo = trunc(src), hi = min(lo + 1, in - 1), weights (1 - frac, frac)."""
    src = np.arange(n_out, dtype=_F32) * _F32(n_in / n_out)
    lo = np.trunc(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo.astype(_F32)
    m = np.zeros((n_out, n_in), _F32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), _F32(1) - frac)
    np.add.at(m, (rows, hi), frac)
    return m


_MATRICES = {"bicubic": bicubic_matrix, "area": area_matrix, "nearest": nearest_matrix,
             "tf1_bilinear": tf1_bilinear_matrix}


def resize_matrix(method: str, n_in: int, n_out: int) -> np.ndarray:
    if method not in _MATRICES:
        raise ValueError(f"resize method must be one of {sorted(_MATRICES)}, got {method!r}")
    return _MATRICES[method](int(n_in), int(n_out))


def resize(x: jax.Array, size: Tuple[int, int], method: str = "bicubic") -> jax.Array:
    """Resize NHWC (or HWC) `x` to spatial `size` (H, W) exactly as torch's F.interpolate(mode=method) on NCHW.

    Computed in float32 with full-precision matmuls (TPU/GPU default precision would round to bf16); returns x.dtype.
    """
    h_out, w_out = int(size[0]), int(size[1])
    h_in, w_in = x.shape[-3], x.shape[-2]
    if (h_in, w_in) == (h_out, w_out):
        return x  # every method is the identity at equal size (torch copies)
    mh = jnp.asarray(resize_matrix(method, h_in, h_out))
    mw = jnp.asarray(resize_matrix(method, w_in, w_out))
    y = jnp.einsum("Hh,...hwc,Ww->...HWc", mh, x.astype(jnp.float32), mw, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)
