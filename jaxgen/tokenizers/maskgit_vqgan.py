"""MaskGIT-VQGAN, the image tokenizer RAR and MaskGIT generate with (bytedance/1d-tokenizer
modeling/modules/maskgit_vqgan.py, used through titok.py `PretrainedTokenizer`): images in [0, 1] <-> code maps.

A pure CNN (no attention), NHWC:
  Encoder: conv_in (3x3, no bias) -> per level i: num_res_blocks ResnetBlocks [+ 2x2 average pool unless last]
           -> mid: num_res_blocks ResnetBlocks -> GN, swish -> conv_out (1x1) -> z (B, H/2^(L-1), W/2^(L-1), z_channels)
  Decoder: conv_in (3x3) -> mid -> levels from deepest to 0: num_res_blocks ResnetBlocks
           [+ nearest x2 and `upsample_conv` (3x3) unless level 0] -> GN, swish -> conv_out (3x3)
  Quantizer: nearest code by squared L2 in a (codebook_size, z_channels) codebook.
Level i has width hidden_channels * channel_mult[i]; an encoder level starts from the previous level's width, a decoder
level from the next deeper one. Official quirks kept: every ResnetBlock conv is bias-free, and when a block changes
width its 1x1 `nin_shortcut` (out -> out) is applied to the block OUTPUT, dropping the input (`residual =
nin_shortcut(hidden_states)`); images are not normalised; `decode_indices` clamps to [0, 1]; the VQ loss weights the
CODEBOOK term by beta (see `__call__`).

Param paths mirror the torch keys with list indices folded into the name: torch `encoder.down.2.block.0.nin_shortcut`
is params['encoder']['down_2']['block_0']['nin_shortcut'], `decoder.mid.1.conv1` is decoder/mid_1/conv1, and the
codebook `quantize.embedding.weight` is params['quantize']['embedding'] (see jaxgen.convert.maskgit_vqgan).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen import strict
from jaxgen.nn.conv import Conv, Downsample, GroupNorm, ResnetBlock
from jaxgen.nn.layers import with_axes
from jaxgen.nn.quantizer import code_counts, commitment_loss, lookup, nearest_code, straight_through

Dtype = Any


class _Stack(nn.Module):
    """Fields shared by the encoder, the decoder and their levels (the official OmegaConf `config`)."""

    hidden_channels: int = 128
    channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    out_channels: int = 3
    dropout: float = 0.0
    num_groups: int = 32
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _fields(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in _STACK_FIELDS}

    def _res(self, features: int, name: str) -> ResnetBlock:
        return ResnetBlock(features, dropout=self.dropout, shortcut="output", use_bias=False,
                           num_groups=self.num_groups, epsilon=self.norm_eps, name=name,
                           dtype=self.dtype, param_dtype=self.param_dtype)

    def _norm(self, name: str) -> GroupNorm:
        return GroupNorm(self.num_groups, self.norm_eps, name=name, dtype=self.dtype, param_dtype=self.param_dtype)

    def _conv(self, features: int, k: int, use_bias: bool, name: str, upsample: bool = False) -> Conv:
        # torch Conv2dSame at stride 1 pads (k-1)/2 zeros on every side for the odd kernels used here
        return Conv(features, k, padding=(k - 1) // 2, use_bias=use_bias, upsample_nearest2=upsample, name=name,
                    dtype=self.dtype, param_dtype=self.param_dtype)


_STACK_FIELDS = ("hidden_channels", "channel_mult", "num_res_blocks", "out_channels", "dropout", "num_groups",
                 "norm_eps", "dtype", "param_dtype")


class _Level(_Stack):
    """One resolution level (torch `DownsamplingBlock` / `UpsamplingBlock`): `block_j` ResnetBlocks to `features`
    channels, then resample 'down' (2x2 average pool), 'up' (nearest x2, then the 3x3 `upsample_conv`) or None."""

    features: int = 0
    resample: Optional[str] = None

    @nn.compact
    def __call__(self, h, deterministic: bool = True):
        for j in range(self.num_res_blocks):
            h = self._res(self.features, f"block_{j}")(h, deterministic)
        if self.resample == "down":
            h = Downsample(with_conv=False, dtype=self.dtype, param_dtype=self.param_dtype)(h)
        elif self.resample == "up":
            # nearest x2 + the 3x3 conv in one sub-pixel conv (jaxgen.nn.conv.nearest_up2_conv3); named as the
            # torch attribute, so it sits beside the blocks rather than inside an Upsample
            h = self._conv(self.features, 3, True, "upsample_conv", upsample=True)(h)
        return h


class Encoder(_Stack):
    """Image (B, H, W, C) -> z (B, H / 2^(L-1), W / 2^(L-1), out_channels)."""

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        ch, mult = self.hidden_channels, tuple(self.channel_mult)
        h = self._conv(ch, 3, False, "conv_in")(x)
        for i, m in enumerate(mult):
            h = _Level(**self._fields(), features=ch * m, resample="down" if i != len(mult) - 1 else None,
                       name=f"down_{i}")(h, deterministic)
        for j in range(self.num_res_blocks):
            h = self._res(ch * mult[-1], f"mid_{j}")(h, deterministic)
        h = self._norm("norm_out")(h, silu=True, deterministic=deterministic)
        return self._conv(self.out_channels, 1, True, "conv_out")(h)


class Decoder(_Stack):
    """z (B, h, w, z_channels) -> image (B, h * 2^(L-1), w * 2^(L-1), out_channels), unclamped."""

    @nn.compact
    def __call__(self, z, deterministic: bool = True):
        ch, mult = self.hidden_channels, tuple(self.channel_mult)
        h = self._conv(ch * mult[-1], 3, True, "conv_in")(z)
        for j in range(self.num_res_blocks):
            h = self._res(ch * mult[-1], f"mid_{j}")(h, deterministic)
        for i in reversed(range(len(mult))):
            h = _Level(**self._fields(), features=ch * mult[i], resample="up" if i != 0 else None,
                       name=f"up_{i}")(h, deterministic)
        h = self._norm("norm_out")(h, silu=True, deterministic=deterministic)
        return self._conv(self.out_channels, 3, True, "conv_out")(h)


def _codebook_init(size: int):
    def init(key, shape, dtype=jnp.float32):
        # the official VectorQuantizer: U(-1/V, 1/V)
        return jax.random.uniform(key, shape, dtype, -1.0 / size, 1.0 / size)
    return init


class VectorQuantizer(nn.Module):
    """Holds the codebook (param `embedding`, (V, C), logical axes ('vocab', 'latent')); the maths is jaxgen.nn.quantizer."""

    codebook_size: int = 1024
    dim: int = 256
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param("embedding", with_axes(_codebook_init(self.codebook_size), ("vocab", "latent")),
                                    (self.codebook_size, self.dim), self.param_dtype)

    def __call__(self, z) -> Tuple[jax.Array, jax.Array]:
        """z (..., C) -> (indices (...) int32, code vectors (..., C) float32); gradients reach the codebook only."""
        idx = nearest_code(z, jax.lax.stop_gradient(self.embedding))
        return idx, self.embed(idx)

    def embed(self, idx) -> jax.Array:
        return lookup(self.embedding, idx).astype(jnp.float32)


class MaskGITVQGAN(nn.Module):
    """The MaskGIT-VQGAN tokenizer. Defaults are the official `PretrainedTokenizer` (maskgit-vqgan-imagenet-f16-256,
    54.5M params): 256px -> 16x16 codes from a 1024 x 256 codebook."""

    hidden_channels: int = 128
    channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    num_channels: int = 3
    z_channels: int = 256  # also the codebook dimension (official embedding_dim)
    resolution: int = 256  # nominal input size; only used for dummy inputs (shape checks)
    dropout: float = 0.0
    codebook_size: int = 1024
    commitment_cost: float = 0.25
    num_groups: int = 32  # official 32; tiny configs with widths < 32 need fewer
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(hidden_channels=self.hidden_channels, channel_mult=tuple(self.channel_mult),
                  num_res_blocks=self.num_res_blocks, dropout=self.dropout, num_groups=self.num_groups,
                  norm_eps=self.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(out_channels=self.z_channels, **kw)
        self.decoder = Decoder(out_channels=self.num_channels, **kw)
        self.quantize_ = VectorQuantizer(self.codebook_size, self.z_channels, self.param_dtype, name="quantize")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    # ------------------------------------------------------------------ inference
    def encode(self, images, train: bool = False):
        """Images NHWC in [0, 1] (no normalisation, as the official) -> continuous z (B, h, w, z_channels) float32."""
        return self.encoder(images, deterministic=not train).astype(jnp.float32)

    def quantize(self, z) -> Tuple[jax.Array, jax.Array]:
        """z (B, h, w, C) -> (indices (B, h, w) int32, quantized z (B, h, w, C) float32); no straight-through."""
        return self.quantize_(z)

    def encode_to_indices(self, images) -> jax.Array:
        """Images in [0, 1] -> code map (B, h, w) int32 (official `PretrainedTokenizer.encode`, unflattened)."""
        return self.quantize(self.encode(images))[0]

    def embed(self, indices) -> jax.Array:
        """Codes (B, h, w), or (B, N) with N a square (read row-major, as get_codebook_entry) -> (B, h, w, C)."""
        if indices.ndim == 2:
            side = int(round(indices.shape[1] ** 0.5))
            if side * side != indices.shape[1]:
                raise ValueError(f"MaskGITVQGAN.embed: {indices.shape[1]} codes per image do not form a square map")
            indices = indices.reshape(indices.shape[0], side, side)
        elif indices.ndim != 3:
            raise ValueError(f"MaskGITVQGAN.embed: indices must be (B, h, w) or (B, h*w), got {indices.shape}")
        return self.quantize_.embed(indices)

    def decode(self, z_quantized, train: bool = False):
        """Quantized z (B, h, w, C) -> images NHWC float32, NOT clamped (the training reconstruction)."""
        return self.decoder(z_quantized.astype(self.dtype), deterministic=not train).astype(jnp.float32)

    def decode_indices(self, indices):
        """Codes (B, h, w) or (B, h*w) -> images clamped to [0, 1] (official `PretrainedTokenizer.decode`)."""
        return jnp.clip(self.decode(self.embed(indices)), 0.0, 1.0)

    # ------------------------------------------------------------------ training forward
    def __call__(self, images, train: bool = True) -> Dict[str, jax.Array]:
        """Training forward: recon = decode(straight-through z_q) (unclamped); idx (B, h, w); counts (V,) code hits;
        z: encoder output (the quantiser inputs, e.g. candidates for a dead-code policy).

        vq_loss is the official VectorQuantizer loss |sg(z_q) - z|^2 + beta |z_q - sg(z)|^2: note beta scales the
        CODEBOOK term (the MishaLaskin VQ-VAE code this quantizer comes from), not the encoder commitment term."""
        z = self.encode(images, train)
        idx, z_q = self.quantize(z)
        vq_loss = commitment_loss(z, z_q, self.commitment_cost, beta_on="codebook")
        recon = self.decode(straight_through(z, z_q), train)
        return {"recon": recon, "vq_loss": vq_loss, "idx": idx, "counts": code_counts(idx, self.codebook_size),
                "z": z}


def maskgit_vqgan_from_config(config: Mapping[str, Any], dtype: Dtype = None, param_dtype: Dtype = None) -> MaskGITVQGAN:
    """Build from a plain mapping of MaskGITVQGAN fields, strictly (`jaxgen.strict`: an unknown key is a ConfigError).
    `dtype` / `param_dtype` may be given here or in the mapping (as names such as 'bfloat16')."""
    fields = dict(config)
    for key, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is not None:
            fields[key] = value
        if key in fields:
            fields[key] = jnp.dtype(fields[key])
    return strict.build(MaskGITVQGAN, fields, "MaskGITVQGAN fields")
