"""MAR's DiffLoss denoiser `SimpleMLPAdaLN`: a per-token MLP with adaLN conditioning on (timestep, z).

x (N, in) -> input_proj -> res blocks modulated by y = time_embed(t) + cond_embed(z) -> final adaLN layer ->
(N, out) = [eps | variance values]. Param names follow the torch modules (`time_embed.mlp.0` -> `time_embed_0`,
`adaLN_modulation.1` -> `ada_ln`) so the converter is a one-to-one key map.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.nn.layers import Dense, Dtype, LayerNorm

_normal_002 = nn.initializers.normal(0.02)
_zeros = nn.initializers.zeros


def timestep_embedding(t, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, order [cos | sin], float32 (GLIDE/DiT form)."""
    half = dim // 2
    # Same float32 op order as the official: exp(float32(-ln P) * arange / half).
    freqs = jnp.exp(jnp.float32(-math.log(max_period)) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def cfg_mix(model_out, cfg_scale, eps_channels: int):
    """Classifier-free guidance on a [cond rows; uncond rows] batch, as the official `forward_with_cfg`:
    eps = eps_u + s (eps_c - eps_u) is given to BOTH halves; the variance channels stay per branch."""
    eps, rest = model_out[:, :eps_channels], model_out[:, eps_channels:]
    cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return jnp.concatenate([jnp.concatenate([half_eps, half_eps], axis=0), rest], axis=-1)


class ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)); (shift, scale, gate) = Linear(SiLU(y)) in that order."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = Dense(3 * self.channels, axes=("embed", "mlp"), kernel_init=_zeros, name="ada_ln", **kw)(nn.silu(y))
        shift, scale, gate = jnp.split(mod, 3, axis=-1)
        h = modulate(LayerNorm(1e-6, name="in_ln", **kw)(x), shift, scale)
        h = Dense(self.channels, axes=("embed", "mlp"), name="mlp_0", **kw)(h)
        h = Dense(self.channels, axes=("mlp", "embed"), name="mlp_2", **kw)(nn.silu(h))
        return x + gate * h


class FinalLayer(nn.Module):
    """Affine-free LN, adaLN (shift, scale), then Linear to the output channels (DiT's final layer)."""

    channels: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = Dense(2 * self.channels, axes=("embed", "mlp"), kernel_init=_zeros, name="ada_ln", **kw)(nn.silu(y))
        shift, scale = jnp.split(mod, 2, axis=-1)
        h = modulate(LayerNorm(1e-6, use_scale=False, use_bias=False, name="norm", **kw)(x), shift, scale)
        return Dense(self.out_channels, axes=("embed", "latent"), kernel_init=_zeros, name="linear", **kw)(h)


class SimpleMLPAdaLN(nn.Module):
    """The DiffLoss MLP. `t` is the ORIGINAL timestep index (0..999), not a respaced one and not rescaled."""

    in_channels: int
    model_channels: int
    out_channels: int
    z_channels: int
    num_res_blocks: int
    frequency_embedding_size: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, c):
        if x.shape[-1] != self.in_channels or c.shape[-1] != self.z_channels:
            raise ValueError(f"SimpleMLPAdaLN expects x (..., {self.in_channels}) and c (..., {self.z_channels}); "
                             f"got {x.shape} and {c.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        w = self.model_channels
        x = Dense(w, axes=("latent", "mlp"), name="input_proj", **kw)(x)
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        temb = Dense(w, axes=(None, "mlp"), kernel_init=_normal_002, name="time_embed_0", **kw)(t_freq)
        temb = Dense(w, axes=("mlp", "embed"), kernel_init=_normal_002, name="time_embed_2", **kw)(nn.silu(temb))
        y = temb + Dense(w, axes=("embed", "mlp"), name="cond_embed", **kw)(c)
        for i in range(self.num_res_blocks):
            x = ResBlock(w, name=f"res_blocks_{i}", **kw)(x, y)
        return FinalLayer(w, self.out_channels, name="final_layer", **kw)(x, y)

    def forward_with_cfg(self, x, t, c, cfg_scale):
        """Rows are [cond; uncond] of the SAME x_t: only the first half of x is used (official behaviour)."""
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half], axis=0), t, c)
        return cfg_mix(out, cfg_scale, self.in_channels)
