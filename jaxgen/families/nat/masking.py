"""NAT training: which tokens are masked, and the cross-entropy on them.

Per sample a mask ratio p is drawn from the configured distribution — AutoNAT's Beta(a, b) (default (12, 3), mean
0.8) or MaskGIT's schedule gamma(r) of r ~ U[0, 1) — then (official NATSchedule.sample) num = max(1, round(L p))
(float32, round half to even) and, with perm = argsort(u) of uniform draws u (B, L), position j is masked iff
perm[j] < num: exactly num positions, a uniformly random set.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.sampling.schedules import mask_ratio


def draw_mask_ratios(rng: jax.Array, batch: int, distribution: str, beta_a: float, beta_b: float,
                     schedule: str, seq_len: int) -> jax.Array:
    """(B,) float32 mask ratios: 'beta' -> Beta(beta_a, beta_b); 'schedule' -> gamma(r), r ~ U[0, 1) under the
    MaskGIT schedule `schedule` (clamped to [1e-6, 1] as MaskGIT does)."""
    if distribution == "beta":
        return jax.random.beta(rng, beta_a, beta_b, (batch,), jnp.float32)
    if distribution == "schedule":
        return mask_ratio(schedule, jax.random.uniform(rng, (batch,)), seq_len, clip=True)
    raise ValueError(f"unknown mask-ratio distribution {distribution!r}; use 'beta' or 'schedule'")


def token_mask(ratios: jax.Array, scores: jax.Array) -> jax.Array:
    """ratios (B,), scores (B, L) uniform -> bool (B, L), True = masked (official rule, see the module doc)."""
    seq_len = scores.shape[-1]
    num = jnp.maximum(jnp.round(seq_len * ratios.astype(jnp.float32)), 1.0)
    perm = jnp.argsort(scores, axis=-1)
    return perm < num[:, None]


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array, smoothing: float = 0.0):
    """torch F.cross_entropy(ignore_index on unmasked, label_smoothing): the mean over masked tokens of
    (1 - eps) * nll + eps * mean_c(-log p_c). Returns (loss, accuracy on masked tokens)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    per_token = (1.0 - smoothing) * nll + smoothing * (-jnp.mean(logp, axis=-1)) if smoothing else nll
    weight = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    loss = jnp.sum(per_token * weight) / count
    acc = jnp.sum((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weight) / count
    return loss, acc
