"""Multi-head self-attention (timm layout) and a reusable scaled dot-product attention function.

Layout of q/k/v everywhere: (batch, length, heads, head_dim) ("BTNH"), as `jax.nn.dot_product_attention` wants.
Softmax always runs in float32 whatever the compute dtype.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.nn.layers import Dense, Dtype, constrain

IMPLS = ("auto", "xla", "cudnn")


def resolve_impl(impl: str, dtype, head_dim: int) -> str:
    """'auto' -> 'cudnn' only where cuDNN flash attention applies (GPU, half precision, supported head_dim)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    on_gpu = jax.default_backend() == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    fits = head_dim <= 128 and head_dim % 8 == 0
    return "cudnn" if (on_gpu and half and fits) else "xla"


def _explicit_attention(q, k, v, mask, bias, scale, dropout_rate, dropout_rng):
    """Reference path (also the only one with attention-probability dropout): f32 logits and softmax."""
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        # A finite floor (not -inf) keeps a fully masked row finite (uniform) instead of NaN.
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None,
                          bias: Optional[jax.Array] = None, impl: str = "auto", *, scale: Optional[float] = None,
                          dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """softmax(q k^T * scale + bias, masked) v.

    q: (B, T, N, H); k, v: (B, S, N, H) (S may differ from T, e.g. with a KV cache).
    mask: bool, True = attend, broadcastable to (B, N, T, S). bias: additive, broadcastable to (B, N, T, S).
    impl: 'auto' | 'xla' | 'cudnn'. Dropout on the attention probabilities (training) always takes the explicit
    XLA path, because `jax.nn.dot_product_attention` has no dropout.
    """
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    use = resolve_impl(impl, q.dtype, head_dim)
    if dropout_rate > 0.0 and dropout_rng is not None:
        if use == "cudnn" and impl == "cudnn":
            raise ValueError("attention impl 'cudnn' does not support attention dropout; use 'auto' or 'xla'")
        return _explicit_attention(q, k, v, mask, bias, scale, dropout_rate, dropout_rng)

    def four_d(a):
        return None if a is None else jnp.reshape(a, (1,) * (4 - a.ndim) + a.shape)

    mask4, bias4 = four_d(mask), four_d(bias)
    if use == "cudnn" and mask4 is not None:
        # cuDNN takes an additive bias; fold the boolean mask into it (finite floor, see above).
        floor = jnp.asarray(jnp.finfo(q.dtype).min / 2, q.dtype)
        extra = jnp.where(mask4, jnp.zeros((), q.dtype), floor)
        bias4 = extra if bias4 is None else (bias4.astype(q.dtype) + extra)
        mask4 = None
    if use == "xla" and bias4 is None and mask4 is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    if use == "xla":
        # jax's XLA path substitutes a large finite negative for masked logits too; bias joins in f32.
        return jax.nn.dot_product_attention(q, k, v, bias=None if bias4 is None else bias4.astype(jnp.float32),
                                            mask=mask4, scale=scale, implementation="xla").astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=None if bias4 is None else bias4.astype(q.dtype),
                                        scale=scale, implementation="cudnn")


class Attention(nn.Module):
    """timm `Attention`: fused qkv Linear (output [q|k|v], each head-major), SDPA, proj.

    Params: `qkv` (kernel (D, 3D), axes ('embed', 'heads')), `proj` (kernel (D, D), axes ('heads', 'embed')).
    `mask`: bool, True = attend, broadcastable to (B, heads, T, T) (e.g. (B, 1, 1, T) for key padding).
    """

    dim: int
    num_heads: int
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, bias=None, deterministic: bool = True):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        b, t, _ = x.shape
        head_dim = self.dim // self.num_heads
        qkv = Dense(3 * self.dim, axes=("embed", "heads"), use_bias=self.qkv_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="qkv")(x)
        qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        use_drop = (not deterministic) and self.attn_drop > 0.0
        out = dot_product_attention(q, k, v, mask=mask, bias=bias, impl=self.impl,
                                    dropout_rate=self.attn_drop if use_drop else 0.0,
                                    dropout_rng=self.make_rng("dropout") if use_drop else None)
        out = constrain(out.reshape(b, t, self.dim), ("batch", "length", "heads"))
        out = Dense(self.dim, axes=("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                    name="proj")(out)
        return nn.Dropout(self.proj_drop)(out, deterministic=deterministic)
