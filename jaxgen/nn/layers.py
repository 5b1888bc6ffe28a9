"""Thin linen wrappers that attach logical axis names to every parameter.

Every parameter in jaxgen carries logical axis names (see `jaxgen.parallel.sharding` for the
rules that map them onto mesh axes). Logical names used across the library:

  'embed'   model width              'mlp'     MLP hidden width
  'heads'   fused attention outputs  'vocab'   codebook / output classes
  'classes' class-embedding rows     'latent'  small tokenizer channel dims (never sharded)
  'conv_in' / 'conv_out' conv channels;  'norm' norm scale/bias;  None: never sharded

Activations use 'batch', 'length', 'embed' through `constrain`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.kernels import cpu as cpu_kernels
from jaxgen.nn import kernel_layout
from jaxgen.nn.dropout import dropout

Dtype = Any
Axes = Sequence[Optional[str]]

# torch.nn.Linear / timm default-compatible initialisers live with each model; these are safe defaults.
xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def with_axes(init: Callable, axes: Axes) -> Callable:
    return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Logical sharding constraint on an activation (no-op outside a mesh / rules context)."""
    return nn.with_logical_constraint(x, tuple(axes))


class Dense(nn.Module):
    """Linear layer: params `kernel` (in, out) and `bias` (out,) with logical axes.

    Computes in `dtype`, accumulates in float32 (fast bf16 on CPU and exact f32 when dtype is f32).
    """

    features: int
    axes: Axes = ("embed", "mlp")
    use_bias: bool = True
    kernel_init: Callable = xavier_uniform
    bias_init: Callable = zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", with_axes(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        # One 2-D matmul over all leading dims: for a (B, L, C) einsum XLA:CPU builds the kernel gradient from a
        # transposed copy of the activations (measured ~1.7x slower backward than the 2-D form).
        lead = x.shape[:-1]
        x2, k = x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel.astype(self.dtype)
        # an out-major kernel's (in, out) view (jaxgen.nn.kernel_layout): XLA's dot, `matmul_wt` and `gemm_wt` read
        # the stored (out, in) array (k.T folds back into it); `matmul` / `gemm` would make XLA copy it back each step
        views = kernel_layout.tracing_views()
        if views and cpu_kernels.wanted_wt(x2.shape[0], x2.dtype, k.dtype):
            y = cpu_kernels.matmul_wt(x2, k.T)
        elif views and cpu_kernels.wanted_gemm(x2.shape[0], x2.dtype, k.dtype, k.size):  # BLAS reads it transposed
            y = cpu_kernels.gemm_wt(x2, k.T)  # (mar_tiny's head at batch 250: XLA's dot on the view ~20 % slower)
        elif not views and cpu_kernels.wanted(x2.shape[0], x2.dtype, k.dtype):  # decode steps: a few rows, bound
            y = cpu_kernels.matmul(x2, k)                                       # by reading the kernel
        elif not views and cpu_kernels.wanted_gemm(x2.shape[0], x2.dtype, k.dtype, k.size):  # BLAS: 5-10 % over XLA
            y = cpu_kernels.gemm(x2, k)
        else:
            y = jnp.dot(x2, k, preferred_element_type=jnp.float32)
        y = y.reshape(lead + (self.features,))
        if self.use_bias:
            bias = self.param("bias", with_axes(self.bias_init, (self.axes[-1],)),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def _normalized_and_rstd(x, eps):
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    return centred * rstd, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def normalize(x, eps: float):
    """(x - mean) / sqrt(var + eps) over the last axis (biased variance, torch's LayerNorm without its affine).
    The gradient is written from the output and 1 / std, so that training keeps those (which the next op's
    gradient mostly needs anyway) and not also x and x - mean, as XLA kept for autodiff's backward (VAR-d16's train
    step: -0.11 GB of its peak, docs/benchmarks.md)."""
    return _normalized_and_rstd(x, eps)[0]


def _normalize_fwd(x, eps):
    y, rstd = _normalized_and_rstd(x, eps)
    return y, (y, rstd)


def _normalize_bwd(eps, saved, g):
    y, rstd = saved
    return (rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - y * jnp.mean(g * y, axis=-1, keepdims=True)),)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class LayerNorm(nn.Module):
    """LayerNorm in float32 with torch semantics (biased variance, eps inside the sqrt).

    Params `scale` and `bias` (torch `weight` and `bias`).
    """

    epsilon: float = 1e-6
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = normalize(x.astype(jnp.float32), self.epsilon)
        features = x.shape[-1]
        if self.use_scale:
            y = y * self.param("scale", with_axes(ones, ("norm",)), (features,), self.param_dtype).astype(jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", with_axes(zeros, ("norm",)), (features,), self.param_dtype).astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nn.Module):
    """Embedding table (num, features) with logical axes."""

    num_embeddings: int
    features: int
    axes: Axes = ("classes", "embed")
    embedding_init: Callable = nn.initializers.normal(0.02)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):
        table = self.param("embedding", with_axes(self.embedding_init, self.axes),
                           (self.num_embeddings, self.features), self.param_dtype)
        return jnp.take(table, ids, axis=0).astype(self.dtype)


def gelu_exact(x):
    """torch's nn.GELU() as torch evaluates it: 0.5 x (1 + erf(x / sqrt 2)). jax.nn.gelu's exact form goes through
    erfc instead (an exp, two divides and two polynomials per element): 2.5-4x the time on XLA:CPU, and ~77 us of
    every RAR-B decode layer at 4 rows against ~15 (docs/benchmarks.md), for a tail accuracy torch does not have."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


_SQRT_2_OVER_PI = 0.7978845608028654


def _gelu_tanh(x):
    return nn.gelu(x, approximate=True)


@jax.custom_vjp
def gelu_tanh(x):
    """torch's nn.GELU(approximate='tanh'): 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), as jax.nn.gelu's
    approximate form computes it. Its gradient is written out with the input as the only residual (tanh recomputed):
    a training step keeps the input and the output (for the next matmul's gradient), as torch does, where with
    autodiff XLA kept a third array of the MLP's width per layer (VAR-d16's train step: -0.29 GB of its peak)."""
    return _gelu_tanh(x)


def _gelu_tanh_derivative(x):
    x2 = x * x
    th = jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x2 * x))
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * (_SQRT_2_OVER_PI * (1.0 + 0.134145 * x2))


gelu_tanh.defvjp(lambda x: (_gelu_tanh(x), x), lambda x, g: (g * _gelu_tanh_derivative(x).astype(g.dtype),))


@jax.custom_jvp
def silu(x):
    """torch's SiLU as torch's CPU kernel evaluates it: x / (1 + exp(-x)). jax.nn.silu (x * logistic(x)) takes ~4x
    the time on XLA:CPU: GroupNorm + SiLU over a VQVAE decoder's 2 x 256 x 256 x 160 activation 41.8 -> 10.8 ms
    (docs/benchmarks.md). The derivative is written out: autodiff of this form would divide inf by inf where
    exp(-x) overflows (x < -88)."""
    return x / (1.0 + jnp.exp(-x))


@silu.defjvp
def _silu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    denominator = 1.0 + jnp.exp(-x)
    y = x / denominator
    s = 1.0 / denominator  # sigmoid(x); 0 where exp(-x) overflows
    return y, t * (s + y * (1.0 - s))


class DropPath(nn.Module):
    """Stochastic depth: each sample's residual branch is dropped with probability `rate` (kept ones scaled by
    1 / (1 - rate)). Identity when deterministic or rate == 0."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if deterministic or self.rate <= 0.0:
            return x
        per_sample = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample, broadcast over the rest
        return dropout(x, self.rate, self.make_rng("dropout"), mask_shape=per_sample)
