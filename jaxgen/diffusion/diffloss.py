"""MAR's DiffLoss around a denoiser apply function `net(x_t, t_original, c) -> (N, 2C)`.

`diffloss_loss` is the official `DiffLoss.forward`; `diffloss_sample` is `DiffLoss.sample`: DDPM ancestral
sampling over the respaced steps, written as ONE `lax.scan` so it compiles once whatever the step count.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxgen.diffusion.gaussian import GaussianDiffusion
from jaxgen.sampling.buckets import chunk_within_budget

Net = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _identity(y):
    return y


class EmbeddedDenoiser(NamedTuple):
    """A denoiser whose conditioning is y = time(t_original) + condition(z), given to `diffloss_sample` in parts:
    z does not change over the DDPM steps and the timesteps are known in advance, so both are embedded once per
    call (the timesteps of all steps in one batch) instead of at every step; the arithmetic per row is the same.
    `modulate(y)` maps y (..., N, W) to what the body reads (a pytree, e.g. every block's adaLN chunks); it runs for
    several DDPM steps in one batch (see `diffloss_sample`'s modulation_bytes), so a small-batch sampler no longer
    streams those weights at every step. body(x_t, m) -> (N, 2C), or body(x_t, m, cfg) for guided sampling (the
    `forward_with_cfg` form), with m = modulate(y) of the step."""

    time: Callable[[jax.Array], jax.Array]
    condition: Callable[[jax.Array], jax.Array]
    body: Callable
    modulate: Callable = _identity


def modulation_bytes_per_step(net: EmbeddedDenoiser, cond: jax.Array) -> int:
    """Bytes of `modulate`'s output for one DDPM step of the rows of `cond` (N, W) (shapes only, nothing runs)."""
    one = jax.eval_shape(net.modulate, jax.ShapeDtypeStruct((1,) + cond.shape, cond.dtype))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(one))


def modulation_chunk(net: EmbeddedDenoiser, cond: jax.Array, steps: int, modulation_bytes: int) -> int:
    """DDPM steps whose `modulate` outputs are computed together: the largest divisor of `steps` whose outputs for
    all rows fit in `modulation_bytes` (at least 1: per step)."""
    return chunk_within_budget(steps, modulation_bytes_per_step(net, cond), modulation_bytes)


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
                    guided: Optional[bool] = None, channels: Optional[int] = None,
                    modulation_bytes: int = 64 << 20) -> jax.Array:
    """Sample token latents (N, C) for conditions z (N, D), as the official `DiffLoss.sample`.

    Unguided (cfg == 1): `net(x_t, t_original, z)`. Guided (cfg != 1, a traced cfg, or `guided=True`): rows
    of z are [cond; uncond]; `net(x_t, t_original, z, cfg)` must be the denoiser's `forward_with_cfg` (as the
    official passes `net.forward_with_cfg` with `cfg_scale`), and the initial noise is drawn for N/2 rows and
    duplicated. ALL N rows are returned, like the official; the caller keeps the first half.
    `net` may also be an `EmbeddedDenoiser` (its body then takes modulate(y) in place of (t_original, z)); its
    `modulate` then runs for as many DDPM steps at once as fit in `modulation_bytes` (a divisor of the step count;
    0: one step at a time), the scan going over those chunks.

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
    noise_steps = None if noise_steps is None else jnp.asarray(noise_steps, jnp.float32)

    def p_step(x_t, k, t_vec, noise, out):
        """One ancestral step from the denoiser's output `out` at x_t."""
        if noise is None:
            noise = jax.random.normal(jax.random.fold_in(step_rng, k), x_t.shape, jnp.float32)
        return diffusion_gen.p_sample(out.astype(jnp.float32), x_t, t_vec, noise, temperature)["sample"]

    if not isinstance(net, EmbeddedDenoiser):
        def step(x_t, inputs):
            k, t, noise = inputs
            t_vec = jnp.full((n,), t, jnp.int32)
            t_orig = diffusion_gen.original_timesteps(t_vec)
            out = net(x_t, t_orig, z, cfg) if guided else net(x_t, t_orig, z)
            return p_step(x_t, k, t_vec, noise, out), None

        x, _ = jax.lax.scan(step, x, (ks, ts, noise_steps))
        return x

    cond = net.condition(z)
    time = net.time(diffusion_gen.original_timesteps(ts))  # (S, W): every step's embedding in one batch
    chunk = modulation_chunk(net, cond, steps, modulation_bytes)

    def inner(x_t, inputs):
        k, t, noise, m = inputs
        out = net.body(x_t, m, cfg) if guided else net.body(x_t, m)
        return p_step(x_t, k, jnp.full((n,), t, jnp.int32), noise, out), None

    def outer(x_t, inputs):
        k, t, noise, time_c = inputs
        mods = net.modulate(time_c[:, None] + cond[None])  # (chunk, N, ...) in one batch
        return jax.lax.scan(inner, x_t, (k, t, noise, mods))[0], None

    def by_chunk(a):
        return None if a is None else a.reshape((steps // chunk, chunk) + a.shape[1:])

    x, _ = jax.lax.scan(outer, x, (by_chunk(ks), by_chunk(ts), by_chunk(noise_steps), by_chunk(time)))
    return x
