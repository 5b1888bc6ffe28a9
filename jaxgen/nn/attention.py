"""Multi-head self-attention (timm layout) and a reusable scaled dot-product attention function.

Layout of q/k/v everywhere: (batch, length, heads, head_dim) ("BTNH"), as `jax.nn.dot_product_attention` wants.
The one exception is a fixed-size KV cache (`KVCache`): (batch, heads, max_len, head_dim), so that a decode step reads
each head's keys as one contiguous block and writes the new ones with a single `dynamic_update_slice`.
Softmax always runs in float32 whatever the compute dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.kernels import cpu as cpu_kernels
from jaxgen.nn.dropout import Dropout, dropout
from jaxgen.nn.layers import Dense, Dtype, LayerNorm, constrain

IMPLS = ("auto", "xla", "cudnn")
KV_LAYOUTS = ("BSNH", "BNSH")


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


def _heads_first(q, k, v, kv_layout):
    """q (B, T, N, H) and k, v in `kv_layout` -> all three (B, N, *, H). XLA:CPU runs the two attention matmuls as
    batched dots over (B, N) and otherwise transposes the BTNH operands inside them, every call: transposing once up
    front is the same arithmetic and faster (VAR-d16's last scale, 4 x 16 heads x 256 queries x 680 keys: 45.7 ->
    32.4 ms; MAR-B's decoder, 4 x 12 x 320 x 320: 19.5 -> 15.0 ms; Intel VM, 2026-12-06)."""
    def bnth(a):
        return jnp.transpose(a, (0, 2, 1, 3))

    return (bnth(q),) + ((k, v) if kv_layout == "BNSH" else (bnth(k), bnth(v)))


def _logits(q, k, mask, bias, scale):
    """f32 (B, N, T, S) attention logits of heads-first q (B, N, T, H), k (B, N, S, H): q k^T * scale + bias, masked
    positions at a finite floor (not -inf), which keeps a fully masked row finite (uniform) instead of NaN."""
    logits = jnp.einsum("bnth,bnsh->bnts", q, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return logits


def _explicit_attention(q, k, v, mask, bias, scale, dropout_rate, dropout_rng, kv_layout="BSNH"):
    """Reference path (the one with attention-probability dropout): f32 logits, softmax, probabilities x v."""
    qt, kt, vt = _heads_first(q, k, v, kv_layout)
    probs = jax.nn.softmax(_logits(qt, kt, mask, bias, scale), axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        probs = dropout(probs, dropout_rate, dropout_rng)
    out = jnp.einsum("bnts,bnsh->bnth", probs.astype(v.dtype), vt, preferred_element_type=jnp.float32)
    return jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype)


def _normalize_last(q, k, v, mask, bias, scale, kv_layout="BSNH"):
    """softmax(logits) v with the normalisation applied to the (B, N, T, H) output instead of the (B, N, T, S)
    probabilities: exp(logits - max) v / sum(exp(logits - max)). The same function; on XLA:CPU it skips a pass over
    the logits (MAR-B's decoder attention, 4 x 12 heads x 320 x 320: 19.5 instead of 30.4 ms on the Intel VM of
    2026-12-04). A fully masked row is uniform, as with jax's own XLA path (see `_logits`)."""
    qt, kt, vt = _heads_first(q, k, v, kv_layout)
    logits = _logits(qt, kt, mask, bias, scale)
    weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    total = jnp.sum(weights, axis=-1, keepdims=True)  # (B, N, T, 1)
    out = jnp.einsum("bnts,bnsh->bnth", weights.astype(v.dtype), vt, preferred_element_type=jnp.float32)
    return jnp.transpose(out / total, (0, 2, 1, 3)).astype(q.dtype)


def _key_mask(mask4: Optional[jax.Array], batch: int, keys: int) -> Optional[jax.Array]:
    """(B, S) bool of a boolean mask that depends on the key only ((B or 1, 1, 1, S)); None for any other mask."""
    if mask4 is None:
        return jnp.ones((batch, keys), bool)
    if mask4.dtype != jnp.bool_ or mask4.shape[1:3] != (1, 1) or mask4.shape[3] != keys:
        return None
    return jnp.broadcast_to(mask4[:, 0, 0, :], (batch, keys))


def clip_query_chunks(chunks: Sequence[Tuple], length: int) -> Tuple[Tuple, ...]:
    """`chunks` (see `dot_product_attention`) cut to the first `length` queries (a prefix of the sequence). An
    unmasked chunk stays unmasked: its queries saw every key before its end, so every key before `length` too."""
    return tuple((a, min(b, length)) + tuple(rest) for a, b, *rest in chunks if a < length)


def _rows(a: Optional[jax.Array], begin: int, end: int, keys: int) -> Optional[jax.Array]:
    """Mask / bias rows [begin, end) and key columns [0, keys) of a (.., T or 1, S or 1) array."""
    if a is None:
        return None
    a = jnp.reshape(a, (1,) * (4 - a.ndim) + a.shape)
    if a.shape[2] > 1:
        a = a[:, :, begin:end]
    return a[..., :keys] if a.shape[3] > 1 else a


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None,
                          bias: Optional[jax.Array] = None, impl: str = "auto", *, scale: Optional[float] = None,
                          dropout_rate: float = 0.0, dropout_rng: Optional[jax.Array] = None,
                          kv_layout: str = "BSNH",
                          query_chunks: Optional[Sequence[Tuple]] = None) -> jax.Array:
    """softmax(q k^T * scale + bias, masked) v.

    q: (B, T, N, H); k, v: (B, S, N, H) (S may differ from T, e.g. with a KV cache), or with kv_layout='BNSH'
    (B, N, S, H) (the `KVCache` layout; always jaxgen's XLA path: a decode step is memory bound, and
    `jax.nn.dot_product_attention` would need a transposed copy of the whole cache).
    mask: bool, True = attend, broadcastable to (B, N, T, S). bias: additive, broadcastable to (B, N, T, S).
    impl: 'auto' | 'xla' | 'cudnn'. Dropout on the attention probabilities (training) always takes the explicit
    XLA path, because `jax.nn.dot_product_attention` has no dropout.
    query_chunks: static ((begin, end), ...) covering the queries in order, for masks under which queries in
    [begin, end) see no key at or after `end` (causal, block-causal): each chunk then attends over keys [0, end)
    only. Same function, fewer FLOPs and smaller logits (VAR-d16's block-causal 680 x 680 at its scale boundaries:
    63 % of the pairs). Self-attention layout (k, v BSNH, key i = query i) only. An entry (begin, end, True)
    declares that the mask lets every query of the chunk see all keys [0, end): its rows of the mask are not used
    (a chunk that is one VAR scale; this is what lets a chunk take the CPU kernel, which has per-key masks only).
    """
    if query_chunks:
        if kv_layout != "BSNH" or k.shape[1] != q.shape[1]:
            raise ValueError("query_chunks needs self-attention: BSNH keys / values as long as the queries")
        if query_chunks[0][0] != 0 or query_chunks[-1][1] != q.shape[1] or any(
                prev[1] != nxt[0] for prev, nxt in zip(query_chunks, query_chunks[1:])):
            raise ValueError(f"query_chunks {tuple(query_chunks)} must cover queries 0..{q.shape[1]} in order")
        head_dim = q.shape[-1]
        unmasked = [(a, b) for a, b, *rest in query_chunks if rest and rest[0]]
        contiguous = all(prev[1] == nxt[0] for prev, nxt in zip(unmasked, unmasked[1:]))
        together = (unmasked and contiguous and bias is None and dropout_rate == 0.0
                    and resolve_impl(impl, q.dtype, head_dim) == "xla"
                    and cpu_kernels.wanted_attention(q.dtype, k.dtype, v.dtype))
        if together:
            # the chunks that see every key before their end: one kernel call over them all, reading q, k, v in place
            joint = cpu_kernels.prefix_chunk_attention(q, k, v, tuple(unmasked),
                                                       float(head_dim ** -0.5 if scale is None else scale))
        outs, row = [], 0
        for i, (a, b, *rest) in enumerate(query_chunks):
            if together and rest and rest[0]:
                outs.append(joint[:, row:row + b - a].astype(q.dtype))
                row += b - a
                continue
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
            rows_mask = None if rest and rest[0] else _rows(mask, a, b, b)
            outs.append(dot_product_attention(q[:, a:b], k[:, :b], v[:, :b], rows_mask, _rows(bias, a, b, b),
                                              impl, scale=scale, dropout_rate=dropout_rate, dropout_rng=rng))
        return jnp.concatenate(outs, axis=1)
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    use = resolve_impl(impl, q.dtype, head_dim)
    if kv_layout == "BNSH":
        if impl == "cudnn":
            raise ValueError("attention impl 'cudnn' does not take a BNSH (KV cache) layout; use 'auto' or 'xla'")
        if dropout_rate > 0.0 and dropout_rng is not None:
            return _explicit_attention(q, k, v, mask, bias, scale, dropout_rate, dropout_rng, kv_layout)
        return _normalize_last(q, k, v, mask, bias, scale, kv_layout)
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
    if use == "xla":
        keep = _key_mask(mask4, q.shape[0], k.shape[1]) if bias4 is None else None
        if keep is not None and cpu_kernels.wanted_attention(q.dtype, k.dtype, v.dtype):
            # jaxgen's CPU kernel keeps the logits of 12 queries at a time in cache and recomputes them for the
            # gradients (MAR-B's decoder attention, 4 x 12 heads x 320 x 320: 13.7 -> 6.0 ms; VAR-d16's last scale,
            # 4 x 16 x 256 x 680: 27 -> 14 ms; Intel VM, 2026-12-06)
            return cpu_kernels.attention(q, k, v, keep, scale)  # float32 operands only
        return _normalize_last(q, k, v, mask4, bias4, scale)
    return jax.nn.dot_product_attention(q, k, v, bias=None if bias4 is None else bias4.astype(q.dtype),
                                        scale=scale, implementation="cudnn")


class KVCache(NamedTuple):
    """Fixed-size key/value cache of one attention layer: k, v (batch, heads, max_len, head_dim).

    Static shapes: a decode step writes its keys at a traced position with `dynamic_update_slice` and attends over
    all max_len slots, masking the ones after its own position, so one compiled step serves every position (e.g. in
    `lax.fori_loop`). Slots are never cleared: only the mask keeps stale / unwritten ones out.
    """

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, batch: int, num_heads: int, max_len: int, head_dim: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, num_heads, max_len, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def write(self, k: jax.Array, v: jax.Array, index) -> "KVCache":
        """Store k, v (B, T, N, H) at slots index .. index + T - 1 (index may be traced).

        Out-of-range writes are clamped by XLA (silently overwriting the last slots), so callers size max_len.
        """
        index = jnp.asarray(index, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, index, zero)
        return KVCache(jax.lax.dynamic_update_slice(self.k, jnp.swapaxes(k, 1, 2).astype(self.k.dtype), start),
                       jax.lax.dynamic_update_slice(self.v, jnp.swapaxes(v, 1, 2).astype(self.v.dtype), start))

    def causal_mask(self, index, length: int) -> jax.Array:
        """(length, max_len) bool: query index + i may attend slots <= index + i."""
        query = jnp.asarray(index, jnp.int32) + jnp.arange(length, dtype=jnp.int32)
        return jnp.arange(self.max_len, dtype=jnp.int32)[None, :] <= query[:, None]


class Attention(nn.Module):
    """timm `Attention`: fused qkv Linear (output [q|k|v], each head-major), optional per-head QK-LayerNorm, SDPA, proj.

    Params: `qkv` (kernel (D, 3D), axes ('embed', 'heads')), `proj` (kernel (D, D), axes ('heads', 'embed')); with
    `qk_norm` also `q_norm` / `k_norm` (LayerNorm over head_dim with affine, shared by all heads: timm's qk_norm).
    `mask`: bool, True = attend, broadcastable to (B, heads, T, T) (e.g. (B, 1, 1, T) for key padding).
    With `cache` (a `KVCache`) the new keys / values are written at slot `cache_index` and the queries attend over the
    whole cache, causally (query i sees slots <= cache_index + i, AND `mask` when given, broadcastable to
    (B, heads, T, max_len)); the call then returns (out, updated cache).
    `query_index` ((B, Q) int, no cache): only those rows of x are queries (keys / values stay all T rows); the
    output is (B, Q, dim), the same rows as the full call would give.
    """

    dim: int
    num_heads: int
    qkv_bias: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x, mask=None, bias=None, deterministic: bool = True, cache: Optional[KVCache] = None,
                 cache_index=None, query_index=None):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        b, t, _ = x.shape
        head_dim = self.dim // self.num_heads
        qkv = Dense(3 * self.dim, axes=("embed", "heads"), use_bias=self.qkv_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="qkv")(x)
        qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.qk_norm:
            q = LayerNorm(self.qk_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="q_norm")(q)
            k = LayerNorm(self.qk_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="k_norm")(k)
        if query_index is not None:
            if cache is not None:
                raise ValueError("Attention takes query_index or a KV cache, not both")
            q = jnp.take_along_axis(q, query_index[:, :, None, None], axis=1)
            t = query_index.shape[1]
        use_drop = (not deterministic) and self.attn_drop > 0.0
        drop = dict(dropout_rate=self.attn_drop if use_drop else 0.0,
                    dropout_rng=self.make_rng("dropout") if use_drop else None)
        if cache is None:
            out = dot_product_attention(q, k, v, mask=mask, bias=bias, impl=self.impl, **drop)
        else:
            if cache_index is None:
                raise ValueError("Attention with a KV cache needs cache_index (the slot of the first new token)")
            cache = cache.write(k, v, cache_index)
            if (t == 1 and mask is None and bias is None and not use_drop
                    and cpu_kernels.wanted_attention(q.dtype, cache.k.dtype, cache.v.dtype)):
                # one token per step: read only the slots written so far (0 .. cache_index)
                out = cpu_kernels.decode_attention(q, cache.k, cache.v, jnp.asarray(cache_index, jnp.int32) + 1,
                                                   head_dim ** -0.5)
            else:
                allowed = cache.causal_mask(cache_index, t)
                if mask is not None:
                    allowed = jnp.logical_and(allowed, mask)
                # the cache layout only has the explicit path: 'cudnn' (a training choice) must not break decoding
                out = dot_product_attention(q, cache.k, cache.v, mask=allowed, bias=bias,
                                            impl="xla" if self.impl == "cudnn" else self.impl, kv_layout="BNSH",
                                            **drop)
        out = constrain(out.reshape(b, t, self.dim), ("batch", "length", "heads"))
        out = Dense(self.dim, axes=("heads", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                    name="proj")(out)
        out = Dropout(self.proj_drop)(out, deterministic=deterministic)
        return out if cache is None else (out, cache)
