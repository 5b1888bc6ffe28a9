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

from jaxgen.nn.layers import Dense, Dtype, LayerNorm, silu

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
    """x + gate * MLP(modulate(LN(x), shift, scale)); (shift, scale, gate) = Linear(SiLU(y)) in that order.
    `modulation(y)` alone gives those three chunks, so a sampler can compute them for many timesteps in one batch
    and pass them as `mod` (then y is not read)."""

    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.ada_ln = Dense(3 * self.channels, axes=("embed", "mlp"), kernel_init=_zeros, **kw)
        self.in_ln = LayerNorm(1e-6, **kw)
        self.mlp_0 = Dense(self.channels, axes=("embed", "mlp"), **kw)
        self.mlp_2 = Dense(self.channels, axes=("mlp", "embed"), **kw)

    def modulation(self, y):
        return tuple(jnp.split(self.ada_ln(silu(y)), 3, axis=-1))

    def __call__(self, x, y=None, mod=None):
        shift, scale, gate = self.modulation(y) if mod is None else mod
        h = modulate(self.in_ln(x), shift, scale)
        h = self.mlp_2(silu(self.mlp_0(h)))
        return x + gate * h


class FinalLayer(nn.Module):
    """Affine-free LN, adaLN (shift, scale), then Linear to the output channels (DiT's final layer); `modulation` /
    `mod` as in `ResBlock`."""

    channels: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.ada_ln = Dense(2 * self.channels, axes=("embed", "mlp"), kernel_init=_zeros, **kw)
        self.norm = LayerNorm(1e-6, use_scale=False, use_bias=False, **kw)
        self.linear = Dense(self.out_channels, axes=("embed", "latent"), kernel_init=_zeros, **kw)

    def modulation(self, y):
        return tuple(jnp.split(self.ada_ln(silu(y)), 2, axis=-1))

    def __call__(self, x, y=None, mod=None):
        shift, scale = self.modulation(y) if mod is None else mod
        return self.linear(modulate(self.norm(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The DiffLoss MLP. `t` is the ORIGINAL timestep index (0..999), not a respaced one and not rescaled.

    `__call__` is the official forward. Its conditioning y = time_embed(t) + cond_embed(c) is also available in
    parts (`embed_time`, `embed_condition`, then `forward_embedded(x, y)`), so a sampler can embed the condition once
    per call and the timesteps of all DDPM steps in one batch instead of at every step (same arithmetic per row).
    Likewise the adaLN chunks of every block (`modulations(y)`, then `forward_modulated(x, mods)`): y depends only
    on (timestep, condition), so a sampler computes them for many DDPM steps in one matmul per block instead of
    streaming the ada_ln weights (3/5 of the denoiser's) at every step."""

    in_channels: int
    model_channels: int
    out_channels: int
    z_channels: int
    num_res_blocks: int
    frequency_embedding_size: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        w = self.model_channels
        self.input_proj = Dense(w, axes=("latent", "mlp"), **kw)
        self.time_embed_0 = Dense(w, axes=(None, "mlp"), kernel_init=_normal_002, **kw)
        self.time_embed_2 = Dense(w, axes=("mlp", "embed"), kernel_init=_normal_002, **kw)
        self.cond_embed = Dense(w, axes=("embed", "mlp"), **kw)
        self.res_blocks = [ResBlock(w, **kw) for _ in range(self.num_res_blocks)]
        self.final_layer = FinalLayer(w, self.out_channels, **kw)

    def embed_time(self, t):
        """(N,) original timestep indices -> (N, W)."""
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.time_embed_2(silu(self.time_embed_0(t_freq)))

    def embed_condition(self, c):
        """(N, z_channels) -> (N, W)."""
        if c.shape[-1] != self.z_channels:
            raise ValueError(f"SimpleMLPAdaLN expects c (..., {self.z_channels}); got {c.shape}")
        return self.cond_embed(c)

    def modulations(self, y):
        """y (..., W) -> every block's adaLN chunks: a tuple (res blocks, then the final layer) of tuples of
        (..., W) arrays."""
        return tuple(block.modulation(y) for block in self.res_blocks) + (self.final_layer.modulation(y),)

    def forward_modulated(self, x, mods):
        """x (N, in) and `modulations(y)` of its rows (each chunk (N, W)) -> (N, out)."""
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"SimpleMLPAdaLN expects x (..., {self.in_channels}); got {x.shape}")
        x = self.input_proj(x)
        for block, mod in zip(self.res_blocks, mods[:-1]):
            x = block(x, mod=mod)
        return self.final_layer(x, mod=mods[-1])

    def forward_embedded(self, x, y):
        """x (N, in) and the conditioning y = embed_time(t) + embed_condition(c) (N, W) -> (N, out)."""
        return self.forward_modulated(x, self.modulations(y))

    def __call__(self, x, t, c):
        return self.forward_embedded(x, self.embed_time(t) + self.embed_condition(c))

    def forward_with_cfg(self, x, t, c, cfg_scale):
        """Rows are [cond; uncond] of the SAME x_t: only the first half of x is used (official behaviour)."""
        return self.forward_embedded_with_cfg(x, self.embed_time(t) + self.embed_condition(c), cfg_scale)

    def forward_embedded_with_cfg(self, x, y, cfg_scale):
        """`forward_with_cfg` given the conditioning y (see `forward_embedded`)."""
        return self.forward_modulated_with_cfg(x, self.modulations(y), cfg_scale)

    def forward_modulated_with_cfg(self, x, mods, cfg_scale):
        """`forward_with_cfg` given the rows' `modulations(y)`."""
        half = x[: x.shape[0] // 2]
        return cfg_mix(self.forward_modulated(jnp.concatenate([half, half], axis=0), mods), cfg_scale,
                       self.in_channels)
