"""MAR's KL-VAE tokenizer (LTH14/mar models/vae.py, LDM's AutoencoderKL): images <-> continuous latents.

Layout (NHWC): the shared LDM conv encoder / decoder (`jaxgen.nn.conv_autoencoder`), attention at the levels whose
nominal resolution is in attn_resolutions plus in the mid block; the encoder outputs 2*z channels if double_z.
quant_conv (1x1) after the encoder gives the moments [mean | logvar]; post_quant_conv (1x1) before the decoder. The
official MAR class builds its Decoder WITHOUT attn_resolutions, so the decoder has attention only in its mid block
(`decoder_attn_resolutions=()`); LDM's own kl-f configs pass attn_resolutions to both.

Param paths mirror the torch keys with list indices folded into the name: torch `encoder.down.1.attn.0.q.weight` is
params['encoder']['down_1']['attn_0']['q']['kernel'] (see jaxgen.convert.kl_vae).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.nn.conv import Conv
from jaxgen.nn.conv_autoencoder import ConvDecoder, ConvEncoder, attn_levels_by_resolution

Dtype = Any


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from moments (..., 2*C) = [mean | logvar] along the last axis (float32)."""

    def __init__(self, moments: jax.Array):
        self.moments = moments.astype(jnp.float32)
        self.mean, logvar = jnp.split(self.moments, 2, axis=-1)
        self.logvar = jnp.clip(logvar, -30.0, 20.0)  # as the official class: keeps exp() finite

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def mode(self):
        return self.mean

    def sample(self, rng: jax.Array):
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, jnp.float32)

    def kl(self):
        """KL(q || N(0, I)) summed over every non-batch axis: shape (B,)."""
        terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder. Defaults are the official MAR KL-16 (66.46M params, stride 16, 16 latent channels)."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    resolution: int = 256
    in_channels: int = 3  # the convs infer it; used for dummy inputs and config checks
    out_ch: int = 3
    z_channels: int = 16
    embed_dim: int = 16
    double_z: bool = True
    dropout: float = 0.0
    # Official MAR: Decoder built without attn_resolutions; set to attn_resolutions for LDM-style decoders.
    decoder_attn_resolutions: Sequence[int] = ()
    # False: quant_conv predicts only the mean and logvar is fixed to 1 (official `use_variational=False`).
    use_variational: bool = True
    # GroupNorm groups (official 32); fewer allows tiny widths such as ch=16.
    num_groups: int = 32
    # Consumers train on z * scale_factor (MAR: 0.2325 = 1 / std of the KL-16 ImageNet latents); a property of the
    # trained latent space, so it travels with the tokenizer. Not used inside the module.
    scale_factor: float = 0.2325
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                      dropout=self.dropout, num_groups=self.num_groups, **kw)
        levels = len(self.ch_mult)
        self.encoder = ConvEncoder(
            out_channels=(2 if self.double_z else 1) * self.z_channels,
            attn_levels=attn_levels_by_resolution(self.resolution, levels, self.attn_resolutions), **common)
        self.decoder = ConvDecoder(
            out_channels=self.out_ch,
            attn_levels=attn_levels_by_resolution(self.resolution, levels, self.decoder_attn_resolutions), **common)
        self.quant_conv = Conv((2 if self.use_variational else 1) * self.embed_dim, 1, **kw)
        self.post_quant_conv = Conv(self.z_channels, 1, **kw)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def encode(self, x, deterministic: bool = True):
        """Image NHWC in [-1, 1] -> moments (B, h, w, 2*embed_dim) = [mean | logvar (unclamped)], float32."""
        moments = self.quant_conv(self.encoder(x, deterministic)).astype(jnp.float32)
        if not self.use_variational:
            moments = jnp.concatenate([moments, jnp.ones_like(moments)], axis=-1)
        return moments

    def decode(self, z, deterministic: bool = True):
        """Latent (B, h, w, embed_dim) -> image NHWC (unclamped), float32."""
        return self.decoder(self.post_quant_conv(z), deterministic).astype(jnp.float32)

    def __call__(self, x, rng: Optional[jax.Array] = None, sample_posterior: bool = True,
                 deterministic: bool = True):
        """(reconstruction, moments). Decodes a posterior sample drawn with `rng` (or the 'sample' rng stream), or the
        mean when sample_posterior is False."""
        moments = self.encode(x, deterministic)
        posterior = DiagonalGaussian(moments)
        if sample_posterior:
            if rng is None:
                if not self.has_rng("sample"):
                    raise ValueError("AutoencoderKL: sample_posterior=True needs `rng` or a 'sample' rng stream")
                rng = self.make_rng("sample")
            z = posterior.sample(rng)
        else:
            z = posterior.mode()
        return self.decode(z.astype(self.dtype), deterministic), moments
