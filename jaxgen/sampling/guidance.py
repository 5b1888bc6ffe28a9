"""Classifier-free guidance: the mixing rule and the per-step guidance-scale schedules of the four families.

Every family mixes the same way, guided = uncond + scale * (cond - uncond) (VAR's (1 + t) cond - t uncond is scale
1 + t); they differ in how the scale moves over the decoding steps.
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from jaxgen.errors import ConfigError


def is_static(value) -> bool:
    """A Python / numpy number (a config value) rather than a traced array (a searched policy value)."""
    return isinstance(value, (int, float, np.number))


def guided(scale, off_value: float) -> bool:
    """Static decision whether guidance runs: a config value equal to `off_value` turns it off; a traced one never
    does (its value is only known at run time)."""
    return not is_static(scale) or float(scale) != off_value


def mix(cond, uncond, scale):
    """uncond + scale * (cond - uncond), in float32."""
    cond, uncond = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    return uncond + scale * (cond - uncond)


def mix_halves(x, scale):
    """x = [cond rows; uncond rows] along axis 0 -> the guided first half."""
    b = x.shape[0] // 2
    return mix(x[:b], x[b:], scale)


def mar_scales(mask_len: np.ndarray, seq_len: int, cfg: float, schedule: str) -> np.ndarray:
    """MAR: the scale of each step. 'linear' (Muse, as official): 1 + (cfg - 1) * (L - mask_len) / L, with mask_len the
    still-masked count after the step (so it never reaches full cfg); 'constant': cfg."""
    mask_len = np.asarray(mask_len, np.float64)
    if not is_static(cfg):  # a traced scale (policy search): the same formula in float32
        ramp = jnp.asarray((seq_len - mask_len) / seq_len, jnp.float32)
        if schedule == "linear":
            return 1.0 + (jnp.asarray(cfg, jnp.float32) - 1.0) * ramp
        if schedule == "constant":
            return jnp.full(mask_len.shape, cfg, jnp.float32)
    if schedule == "linear":
        return (1.0 + (cfg - 1.0) * (seq_len - mask_len) / seq_len).astype(np.float32)
    if schedule == "constant":
        return np.full(mask_len.shape, cfg, np.float32)
    raise ConfigError(f"config.sample.cfg_schedule must be 'linear' or 'constant', got {schedule!r}")


def var_scales(num_scales: int, cfg: float) -> np.ndarray:
    """VAR: t = cfg * si / (S - 1) ramps linearly over the scales; the mixing scale is 1 + t (scale 0 unguided)."""
    ratio = np.arange(num_scales, dtype=np.float64) / max(num_scales - 1, 1) if num_scales > 1 else np.ones(1)
    return (1.0 + cfg * ratio).astype(np.float32)


def power_cosine_scale(step, num_steps: int, guidance, power):
    """RAR: 1 + (g - 1) * (1 - cos(pi * (t / T) ** power)) / 2 at step t (traced or static); power 0 = constant g."""
    t = jnp.asarray(step, jnp.float32) / num_steps
    ramp = (1.0 - jnp.cos(jnp.pi * t ** power)) / 2.0
    return jnp.where(power == 0, guidance, 1.0 + (guidance - 1.0) * ramp)
