"""timm 0.9.12 ViT building blocks: `Mlp`, pre-norm `Block`, and `BlockStack` (depth x Block, optional remat / scan).

Param names follow timm so converters stay one-to-one: norm1, attn/{qkv,proj}, norm2, mlp/{fc1,fc2}.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.nn.attention import Attention
from jaxgen.nn.layers import Dense, Dtype, LayerNorm, constrain, gelu_exact, gelu_tanh

ACTIVATIONS = {"gelu_exact": gelu_exact, "gelu_tanh": gelu_tanh}


class Mlp(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout (timm `Mlp`)."""

    hidden_features: int
    out_features: Optional[int] = None
    act: str = "gelu_exact"  # timm's nn.GELU default is the exact erf form
    drop: float = 0.0
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
        h = nn.Dropout(self.drop)(h, deterministic=deterministic)
        h = Dense(out, axes=("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(h)
        return nn.Dropout(self.drop)(h, deterministic=deterministic)


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(norm1(x)); x += mlp(norm2(x)). No LayerScale / DropPath.

    `proj_drop` is timm's name: it drops after attn.proj and inside the Mlp (after GELU and after fc2).
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
    def __call__(self, x, mask=None, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(self.norm_eps, name="norm1", **kw)(x)
        x = x + Attention(self.dim, self.num_heads, self.qkv_bias, self.attn_drop, self.proj_drop,
                          self.attention_impl, name="attn", **kw)(h, mask=mask, deterministic=deterministic)
        h = LayerNorm(self.norm_eps, name="norm2", **kw)(x)
        x = x + Mlp(int(self.dim * self.mlp_ratio), act=self.act, drop=self.proj_drop, name="mlp", **kw)(
            h, deterministic=deterministic)
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
    `block` holds the Block fields (dim, num_heads, mlp_ratio, qkv_bias, norm_eps, attn_drop, proj_drop, act,
    attention_impl, dtype, param_dtype).
    """

    depth: int
    block: Any  # dict of Block kwargs (a FrozenDict inside linen)
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, x, mask=None, deterministic: bool = True):
        kwargs = dict(self.block)
        if self.scan:
            cls = _ScanBlock
            if self.remat:
                cls = nn.remat(cls, prevent_cse=False)
            stack = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast,), length=self.depth,
                            metadata_params={nn.PARTITION_NAME: None})
            x, _ = stack(kwargs, deterministic, name="layers")(x, mask)
            return x
        cls = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
        for i in range(self.depth):
            x = cls(**kwargs, name=f"block_{i}")(x, mask, deterministic)
        return x
