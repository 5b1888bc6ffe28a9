"""The LDM / taming convolutional encoder and decoder, shared by MAR's KL-VAE and VAR's multi-scale VQVAE (NHWC).

  ConvEncoder: conv_in -> per level i: num_res_blocks x (ResnetBlock [+ AttnBlock if i in attn_levels])
               [+ Downsample unless last] -> mid (Res [, Attn], Res) -> GN, swish -> conv_out.
  ConvDecoder: conv_in -> mid -> levels from deepest to 0: (num_res_blocks + 1) x (ResnetBlock [+ AttnBlock])
               [+ Upsample unless level 0] -> GN, swish -> conv_out.

Level i has width ch * ch_mult[i]. Param names mirror the torch keys with list indices folded into the name
(torch `encoder.down.1.attn.0.q` -> encoder/down_1/attn_0/q, `mid.block_1` -> mid/block_1), so both converters map
keys mechanically. The two official models differ only in where attention sits (LDM: by nominal resolution; VAR: the
deepest level) and in its q/k/v layout (separate 1x1 convs vs one fused `qkv`).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.nn.conv import AttnBlock, Conv, Downsample, GroupNorm, ResnetBlock, Upsample

Dtype = Any


def attn_levels_by_resolution(resolution: int, num_levels: int, attn_resolutions: Sequence[int]) -> Tuple[int, ...]:
    """LDM's rule: level i (nominal size resolution / 2^i) gets attention when that size is in attn_resolutions."""
    return tuple(i for i in range(num_levels) if resolution // 2 ** i in tuple(attn_resolutions))


class _Mid(nn.Module):
    """Res -> [Attn] -> Res at the lowest resolution (torch `mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

    attn: bool = True
    fused_qkv: bool = False
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, deterministic: bool = True):
        kw = dict(num_groups=self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        h = ResnetBlock(dropout=self.dropout, name="block_1", **kw)(h, deterministic)
        if self.attn:
            h = AttnBlock(fused_qkv=self.fused_qkv, name="attn_1", **kw)(h)
        return ResnetBlock(dropout=self.dropout, name="block_2", **kw)(h, deterministic)


class _Level(nn.Module):
    """One resolution level: `block_j` ResnetBlocks (each followed by `attn_j` when use_attn), then an optional resampler
    (`downsample` / `upsample`)."""

    features: int
    num_blocks: int
    use_attn: bool
    resample: Optional[str]  # None | 'down' | 'up'
    fused_qkv: bool = False
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(num_groups=self.num_groups, **kw)
        for j in range(self.num_blocks):
            h = ResnetBlock(self.features, dropout=self.dropout, name=f"block_{j}", **norm)(h, deterministic)
            if self.use_attn:
                h = AttnBlock(fused_qkv=self.fused_qkv, name=f"attn_{j}", **norm)(h)
        if self.resample == "down":
            h = Downsample(name="downsample", **kw)(h)
        elif self.resample == "up":
            h = Upsample(name="upsample", **kw)(h)
        return h


class _ConvStack(nn.Module):
    """Fields shared by the encoder and the decoder."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    out_channels: int = 3
    attn_levels: Sequence[int] = ()
    mid_attn: bool = True
    fused_qkv: bool = False
    dropout: float = 0.0
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _level_kwargs(self):
        return dict(fused_qkv=self.fused_qkv, dropout=self.dropout, num_groups=self.num_groups, dtype=self.dtype,
                    param_dtype=self.param_dtype)


class ConvEncoder(_ConvStack):
    """Image (B, H, W, C) -> (B, H / 2^(L-1), W / 2^(L-1), out_channels)."""

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        level = self._level_kwargs()
        h = Conv(self.ch, 3, padding=1, name="conv_in", **kw)(x)
        last = len(self.ch_mult) - 1
        for i, mult in enumerate(self.ch_mult):
            h = _Level(self.ch * mult, self.num_res_blocks, i in tuple(self.attn_levels),
                       "down" if i != last else None, name=f"down_{i}", **level)(h, deterministic)
        h = _Mid(self.mid_attn, name="mid", **level)(h, deterministic)
        h = GroupNorm(self.num_groups, name="norm_out", **kw)(h, silu=True, deterministic=deterministic)
        return Conv(self.out_channels, 3, padding=1, name="conv_out", **kw)(h)


class ConvDecoder(_ConvStack):
    """Latent (B, h, w, z) -> image (B, h * 2^(L-1), w * 2^(L-1), out_channels)."""

    @nn.compact
    def __call__(self, z, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        level = self._level_kwargs()
        last = len(self.ch_mult) - 1
        h = Conv(self.ch * self.ch_mult[last], 3, padding=1, name="conv_in", **kw)(z)
        h = _Mid(self.mid_attn, name="mid", **level)(h, deterministic)
        for i in reversed(range(len(self.ch_mult))):
            h = _Level(self.ch * self.ch_mult[i], self.num_res_blocks + 1, i in tuple(self.attn_levels),
                       "up" if i != 0 else None, name=f"up_{i}", **level)(h, deterministic)
        h = GroupNorm(self.num_groups, name="norm_out", **kw)(h, silu=True, deterministic=deterministic)
        return Conv(self.out_channels, 3, padding=1, name="conv_out", **kw)(h)
