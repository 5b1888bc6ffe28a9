"""MAR's DiffLoss around a denoiser apply function `net(x_t, t_original, c) -> (N, 2C)`.

`diffloss_loss` is the official `DiffLoss.forward`; `diffloss_sample` is `DiffLoss.sample`: DDPM ancestral
sampling over the respaced steps, written as ONE `lax.scan` so it compiles once whatever the step count.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxgen.diffusion.gaussian import GaussianDiffusion

Net = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class EmbeddedDenoiser(NamedTuple):
    """A denoiser whose conditioning is y = time(t_original) + condition(z), given to `diffloss_sample` in parts:
    z does not change over the DDPM steps and the timesteps are known in advance, so both are embedded once per
    call (the timesteps of all steps in one batch) instead of at every step; the arithmetic per row is the same.
    body(x_t, y) -> (N, 2C), or body(x_t, y, cfg) for guided sampling (the `forward_with_cfg` form)."""

    time: Callable[[jax.Array], jax.Array]
    condition: Callable[[jax.Array], jax.Array]
    body: Callable


def diffloss_loss(net: Net, target, z, mask: Optional[jax.Array], rng: Optional[jax.Array],
                  diffusion: GaussianDiffusion, *, t: Optional[jax.Array] = None,
                  noise: Optional[jax.Array] = None) -> jax.Array:
    """Scalar loss: t ~ U{0..T-1} and eps ~ N(0, I) per row; mean over rows, or sum(loss*mask)/sum(mask).

    `t` ((N,) respaced indices) and `noise` ((N, C)) replace the random draws (parity tests); `rng` may be None
    when both are given.
    """
    if rng is None and (t is None or noise is None):
        raise ValueError("diffloss_loss needs rng unless both t and noise are given")
    t_rng, noise_rng = jax.random.split(rng) if rng is not None else (None, None)
    if t is None:
        t = jax.random.randint(t_rng, (target.shape[0],), 0, diffusion.num_timesteps)
    if noise is None:
        noise = jax.random.normal(noise_rng, target.shape, jnp.float32)
    t = jnp.asarray(t).astype(jnp.int32)
    noise = jnp.asarray(noise, jnp.float32)
    terms = diffusion.training_losses(lambda x, ts: net(x, ts, z), target.astype(jnp.float32), t, noise)
    loss = terms["loss"]
    if mask is not None:
        mask = mask.astype(jnp.float32)
        return jnp.sum(loss * mask) / jnp.sum(mask)
    return jnp.mean(loss)


def _is_guided(cfg, guided: Optional[bool]) -> bool:
    """The official branches on `cfg != 1.0` in Python. A traced cfg (e.g. MAR's per-step linear schedule,
    which starts above 1 whenever cfg != 1) can only come from a guided loop, so it counts as guided."""
    if guided is not None:
        return bool(guided)
    try:
        return float(cfg) != 1.0
    except jax.errors.ConcretizationTypeError:
        return True


def diffloss_sample(net, z, rng: Optional[jax.Array], diffusion_gen: GaussianDiffusion,
                    temperature=1.0, cfg=1.0, noise_init=None, noise_steps=None,
                    guided: Optional[bool] = None, channels: Optional[int] = None) -> jax.Array:
    """Sample token latents (N, C) for conditions z (N, D), as the official `DiffLoss.sample`.

    Unguided (cfg == 1): `net(x_t, t_original, z)`. Guided (cfg != 1, a traced cfg, or `guided=True`): rows
    of z are [cond; uncond]; `net(x_t, t_original, z, cfg)` must be the denoiser's `forward_with_cfg` (as the
    official passes `net.forward_with_cfg` with `cfg_scale`), and the initial noise is drawn for N/2 rows and
    duplicated. ALL N rows are returned, like the official; the caller keeps the first half.
    `net` may also be an `EmbeddedDenoiser` (its body then takes y in place of (t_original, z)).

    temperature scales only the per-step noise; the last step (t = 0) adds none. `noise_init` ((N or N/2, C))
    and `noise_steps` ((S, N, C), k = 0 is the largest t) replace the random draws (parity tests).
    `channels` (C, the denoiser's in_channels) is needed unless one of them is given.
    """
    guided = _is_guided(cfg, guided)
    n = z.shape[0]
    if guided and n % 2:
        raise ValueError(f"guided sampling needs an even number of rows ([cond; uncond]), got {n}")
    if channels is None:
        if noise_init is not None:
            channels = noise_init.shape[-1]
        elif noise_steps is not None:
            channels = noise_steps.shape[-1]
        else:
            raise ValueError("diffloss_sample needs `channels` (the token width) when no noise is given")
    steps = diffusion_gen.num_timesteps
    if rng is None and (noise_init is None or noise_steps is None):
        raise ValueError("diffloss_sample needs rng unless both noise_init and noise_steps are given")
    init_rng, step_rng = jax.random.split(rng) if rng is not None else (None, None)

    rows0 = n // 2 if guided else n
    if noise_init is None:
        noise_init = jax.random.normal(init_rng, (rows0, channels), jnp.float32)
    if noise_init.shape != (rows0, channels):
        raise ValueError(f"noise_init must have shape {(rows0, channels)}, got {noise_init.shape}")
    x = jnp.asarray(noise_init, jnp.float32)
    if guided:
        x = jnp.concatenate([x, x], axis=0)
    if noise_steps is not None and noise_steps.shape != (steps, n, channels):
        raise ValueError(f"noise_steps must have shape {(steps, n, channels)}, got {noise_steps.shape}")

    ks = jnp.arange(steps, dtype=jnp.int32)
    ts = steps - 1 - ks  # respaced indices, largest first
    embedded = isinstance(net, EmbeddedDenoiser)
    if embedded:
        cond = net.condition(z)
        time = net.time(diffusion_gen.original_timesteps(ts))  # (S, W): every step's embedding in one batch

    def step(x_t, inputs):
        k, t, noise = inputs
        if noise is None:
            noise = jax.random.normal(jax.random.fold_in(step_rng, k), x_t.shape, jnp.float32)
        t_vec = jnp.full((n,), t, jnp.int32)
        if embedded:
            y = time[k][None] + cond
            out = net.body(x_t, y, cfg) if guided else net.body(x_t, y)
        else:
            t_orig = diffusion_gen.original_timesteps(t_vec)
            out = net(x_t, t_orig, z, cfg) if guided else net(x_t, t_orig, z)
        return diffusion_gen.p_sample(out.astype(jnp.float32), x_t, t_vec, noise, temperature)["sample"], None

    xs = (ks, ts, None if noise_steps is None else jnp.asarray(noise_steps, jnp.float32))
    x, _ = jax.lax.scan(step, x, xs)
    return x
