"""timm 0.9.12 ViT building blocks: `Mlp`, pre-norm `Block`, and `BlockStack` (depth x Block, optional remat / scan);
DiT-style adaLN-Zero conditioning: `AdaLNZeroBlock` and `AdaLNFinalNorm`.

Param names follow timm so converters stay one-to-one: norm1, attn/{qkv,proj}, norm2, mlp/{fc1,fc2}
(+ attn/{q_norm,k_norm} with QK-norm, adaLN_modulation for the adaLN modules).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.nn.attention import Attention, KVCache
from jaxgen.nn.dropout import Dropout
from jaxgen.nn.fence import gradient_fence
from jaxgen.nn.layers import Dense, Dtype, LayerNorm, constrain, gelu_exact, gelu_tanh, silu, zeros

ACTIVATIONS = {"gelu_exact": gelu_exact, "gelu_tanh": gelu_tanh}


class Mlp(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout (timm `Mlp`); `drop_hidden=False` drops only after fc2 (BERT)."""

    hidden_features: int
    out_features: Optional[int] = None
    act: str = "gelu_exact"  # timm's nn.GELU default is the exact erf form
    drop: float = 0.0
    drop_hidden: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"Mlp act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        out = self.out_features or x.shape[-1]
        h = Dense(self.hidden_features, axes=("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="fc1")(x)
        h = ACTIVATIONS[self.act](h)
        h = constrain(h, ("batch", "length", "mlp"))
        if self.drop_hidden:
            h = Dropout(self.drop)(h, deterministic=deterministic)
        h = Dense(out, axes=("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(h)
        return Dropout(self.drop)(h, deterministic=deterministic)


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(norm1(x)); x += mlp(norm2(x)). No LayerScale / DropPath.

    `proj_drop` is timm's name: it drops after attn.proj and inside the Mlp (after GELU and after fc2).
    `query_index` ((B, Q) int): compute only those output rows (all rows still serve as keys / values).
    """

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    act: str = "gelu_exact"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, deterministic: bool = True, query_index=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(self.norm_eps, name="norm1", **kw)(x)
        attn = Attention(self.dim, self.num_heads, self.qkv_bias, self.attn_drop, self.proj_drop,
                         self.attention_impl, name="attn", **kw)(h, mask=mask, deterministic=deterministic,
                                                                 query_index=query_index)
        if query_index is not None:
            x = jnp.take_along_axis(x, query_index[..., None], axis=1)
        x = x + attn
        h = LayerNorm(self.norm_eps, name="norm2", **kw)(x)
        x = x + Mlp(int(self.dim * self.mlp_ratio), act=self.act, drop=self.proj_drop, name="mlp", **kw)(
            h, deterministic=deterministic)
        return gradient_fence(constrain(x, ("batch", "length", "embed")))  # see AdaLNZeroBlock


class PostLNBlock(nn.Module):
    """Post-norm (BERT) block: x = LN(x + drop(attn(x))); x = LN(x + drop(mlp(x))), the MLP dropping only after
    its output projection. Param names as `Block` (norm1 follows attention, norm2 the MLP)."""

    dim: int
    num_heads: int
    mlp_dim: int
    qkv_bias: bool = True
    norm_eps: float = 1e-12
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    act: str = "gelu_tanh"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Attention(self.dim, self.num_heads, self.qkv_bias, self.attn_drop, self.proj_drop,
                      self.attention_impl, name="attn", **kw)(x, mask=mask, deterministic=deterministic)
        x = LayerNorm(self.norm_eps, name="norm1", **kw)(x + h)
        h = Mlp(self.mlp_dim, act=self.act, drop=self.proj_drop, drop_hidden=False, name="mlp", **kw)(
            x, deterministic=deterministic)
        x = LayerNorm(self.norm_eps, name="norm2", **kw)(x + h)
        return constrain(x, ("batch", "length", "embed"))


class _ScanBlock(nn.Module):
    """Adapter giving Block the (carry, xs) -> (carry, ys) signature nn.scan needs."""

    block: dict
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, mask):
        return Block(**self.block, name="block")(x, mask, self.deterministic), None


class BlockStack(nn.Module):
    """`depth` Blocks applied in sequence.

    Param layout: `block_0 ... block_{depth-1}` (one subtree per block), or with `scan=True` a single `layers/block`
    subtree whose leaves carry a leading depth axis (compiles one block; converters must stack).
    `remat=True` rematerialises each block in the backward pass (activation memory ~ one block).
    `query_index` ((B, Q) int): return only those rows; without scan the last block computes only them (a sampler
    that needs a few rows saves most of that block), with scan the rows are gathered at the end (same result).
    `block` holds the Block fields (dim, num_heads, mlp_ratio, qkv_bias, norm_eps, attn_drop, proj_drop, act,
    attention_impl, dtype, param_dtype).
    """

    depth: int
    block: Any  # dict of Block kwargs (a FrozenDict inside linen)
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, x, mask=None, deterministic: bool = True, query_index=None):
        kwargs = dict(self.block)
        if self.scan:
            cls = _ScanBlock
            if self.remat:
                cls = nn.remat(cls, prevent_cse=False)
            stack = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast,), length=self.depth,
                            metadata_params={nn.PARTITION_NAME: None})
            x, _ = stack(kwargs, deterministic, name="layers")(x, mask)
            return x if query_index is None else jnp.take_along_axis(x, query_index[..., None], axis=1)
        cls = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
        for i in range(self.depth):
            last = i == self.depth - 1
            x = cls(**kwargs, name=f"block_{i}")(x, mask, deterministic, query_index if last else None)
        return x


# ----------------------------------------------------------------------------- adaLN-Zero (DiT) conditioning
def _modulation_dense(features: int, chunks: int, dtype, param_dtype, name: Optional[str] = "adaLN_modulation"):
    """The Linear of adaLN_modulation = Linear(SiLU(c)), zero init (the "-Zero" of adaLN-Zero)."""
    return Dense(chunks * features, axes=("embed", "mlp"), kernel_init=zeros, bias_init=zeros, dtype=dtype,
                 param_dtype=param_dtype, name=name)


def _apply_modulation(dense, c, chunks: int, packed: bool = False):
    """c: (B, D) (one vector per sample) or (B, T, D) (one per sequence position) -> `chunks` f32 arrays
    (B, T or 1, D), or with `packed` the one array (B, T or 1, chunks * D) they are split from."""
    c = c[:, None] if c.ndim == 2 else c
    out = dense(silu(c.astype(jnp.float32))).astype(jnp.float32)
    return out if packed else tuple(jnp.split(out, chunks, axis=-1))


def _modulation(c, features: int, dtype, param_dtype, chunks: int):
    return _apply_modulation(_modulation_dense(features, chunks, dtype, param_dtype), c, chunks)


class AdaLNZeroBlock(nn.Module):
    """Pre-norm block with adaLN-Zero: chunks (shift, scale, gate) x (attention, MLP) of adaLN_modulation(SiLU(c)):
    x += gate_msa * attn(norm1(x) * (1 + scale_msa) + shift_msa); x += gate_mlp * mlp(norm2(x) * (1 + scale_mlp) + ...).

    `norm_affine`: whether norm1 / norm2 keep their own LayerNorm affine (RAR: yes; DiT: no). The residual stream is
    float32 (the returned x too); attention / MLP run in `dtype`. With `cache` (a `KVCache`) the attention writes
    and reads it at `cache_index` and the call returns (x, cache); see `Attention`.

    `modulation(c)` gives the six chunks alone; passing them to `__call__` as `modulation` (then `c` is unused)
    lets a decoder compute them for many future positions in one batched matmul instead of re-reading the
    D x 6D weights for every token (a third of RAR-B's weights). `modulation(c, packed=True)` gives them unsplit,
    (B, T, 6D), which `__call__` also takes: a decoder then slices one position out of the packed array per step
    instead of copying six strided chunks of every position ahead (RAR-B: 0.3 s of a sample).
    """

    dim: int
    num_heads: int
    mlp_dim: int
    qkv_bias: bool = True
    qk_norm: bool = False
    norm_eps: float = 1e-6
    norm_affine: bool = True
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    act: str = "gelu_exact"
    attention_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(use_scale=self.norm_affine, use_bias=self.norm_affine, dtype=jnp.float32,
                    param_dtype=self.param_dtype)
        self.adaLN_modulation = _modulation_dense(self.dim, 6, self.dtype, self.param_dtype, name=None)
        self.norm1 = LayerNorm(self.norm_eps, **norm)
        self.attn = Attention(self.dim, self.num_heads, self.qkv_bias, self.attn_drop, self.proj_drop,
                              self.attention_impl, qk_norm=self.qk_norm, qk_norm_eps=self.norm_eps, **kw)
        self.norm2 = LayerNorm(self.norm_eps, **norm)
        self.mlp = Mlp(self.mlp_dim, act=self.act, drop=self.proj_drop, **kw)

    def modulation(self, c, packed: bool = False):
        """c (B, D) or (B, T, D) -> (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), f32 (B, T|1, D);
        with `packed` them concatenated, (B, T|1, 6D)."""
        return _apply_modulation(self.adaLN_modulation, c, 6, packed)

    def __call__(self, x, c, mask=None, deterministic: bool = True, cache: Optional[KVCache] = None,
                 cache_index=None, modulation=None):
        if modulation is None:
            modulation = self.modulation(c)
        elif not isinstance(modulation, (tuple, list)):
            modulation = tuple(jnp.split(modulation, 6, axis=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x.astype(jnp.float32)
        h = (self.norm1(x) * (1.0 + scale_msa) + shift_msa).astype(self.dtype)
        if cache is None:
            h = self.attn(h, mask=mask, deterministic=deterministic)
        else:
            h, cache = self.attn(h, mask=mask, deterministic=deterministic, cache=cache, cache_index=cache_index)
        x = x + gate_msa * h.astype(jnp.float32)
        h = (self.norm2(x) * (1.0 + scale_mlp) + shift_mlp).astype(self.dtype)
        h = self.mlp(h, deterministic=deterministic)
        x = constrain(x + gate_mlp * h.astype(jnp.float32), ("batch", "length", "embed"))
        if cache is None:  # training / teacher forcing: keep the backward linear in depth on XLA:CPU
            return gradient_fence(x)
        return x, cache


class AdaLNFinalNorm(nn.Module):
    """Affine-free LayerNorm modulated by the condition: norm(x) * (1 + scale) + shift, the two chunks of
    adaLN_modulation(SiLU(c)) (D -> 2D, zero init) in `chunk_order` ('shift_scale': DiT; 'scale_shift': RAR).
    Output in `dtype` (the projection to the vocabulary is the caller's)."""

    dim: int
    norm_eps: float = 1e-6
    chunk_order: str = "shift_scale"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        if self.chunk_order not in ("shift_scale", "scale_shift"):
            raise ValueError(f"chunk_order must be 'shift_scale' or 'scale_shift', got {self.chunk_order!r}")
        first, second = _modulation(c, self.dim, self.dtype, self.param_dtype, 2)
        shift, scale = (first, second) if self.chunk_order == "shift_scale" else (second, first)
        y = LayerNorm(self.norm_eps, use_scale=False, use_bias=False, dtype=jnp.float32)(x)
        return (y * (1.0 + scale) + shift).astype(self.dtype)
