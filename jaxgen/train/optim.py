"""Learning-rate schedules and the AdamW optimizer with family weight-decay masks and global-norm clipping."""
from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxgen.errors import ConfigError


def peak_lr(optim_cfg, batch_size: int) -> float:
    """Absolute lr, or the MAE/MAR/VAR convention lr = blr * batch / 256 when blr is set."""
    if optim_cfg.get("blr", 0.0):
        return float(optim_cfg.blr) * batch_size / 256.0
    return float(optim_cfg.lr)


def make_schedule(optim_cfg, total_steps: int, batch_size: int) -> optax.Schedule:
    """Linear warmup from warmup_init*peak to peak, then constant / cosine / linear / lin0 (VAR) to end_factor*peak."""
    peak = peak_lr(optim_cfg, batch_size)
    warm = int(optim_cfg.warmup_steps)
    init = float(optim_cfg.get("warmup_init", 0.0)) * peak
    end = float(optim_cfg.get("end_factor", 0.0)) * peak
    decay_steps = max(int(total_steps) - warm, 1)
    kind = optim_cfg.schedule
    if kind == "constant":
        after = optax.constant_schedule(peak)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif kind == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif kind == "lin0":
        # VAR: hold the peak for the first 5% of the post-warmup steps, then linear to end_factor * peak.
        hold = max(int(0.05 * decay_steps), 0)
        after = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, end, max(decay_steps - hold, 1))],
                                     [hold])
    else:
        raise ConfigError(f"unknown optim.schedule {kind!r}; use constant, cosine, linear or lin0")
    if warm <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(init, peak, warm), after], [warm])


def make_optimizer(optim_cfg, schedule: optax.Schedule, decay_mask) -> optax.GradientTransformation:
    if optim_cfg.name != "adamw":
        raise ConfigError(f"unknown optim.name {optim_cfg.name!r}; only 'adamw' is available")
    parts = []
    if optim_cfg.grad_clip and optim_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip)))
    parts.append(optax.adamw(schedule, b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
                             weight_decay=float(optim_cfg.weight_decay), mask=decay_mask, mu_dtype=jnp.float32))
    return optax.chain(*parts)
