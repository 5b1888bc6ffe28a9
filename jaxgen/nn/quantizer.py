"""Vector-quantisation helpers shared by the VQ tokenizers (VAR's multi-scale VQVAE, MaskGIT's VQGAN).

All functions are pure and shape-static. Distances and losses are float32; matmuls use full precision so the
nearest-code choice matches the torch reference (indices must be exact).
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def code_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Squared L2 distances (N, V) = |z|^2 + |e|^2 - 2 z.e, in float32 (the torch reference's formula and order)."""
    z = z.astype(jnp.float32)
    e = codebook.astype(jnp.float32)
    zz = jnp.sum(jnp.square(z), axis=-1, keepdims=True)
    ee = jnp.sum(jnp.square(e), axis=-1)
    return (zz + ee) - 2.0 * jnp.einsum("nc,vc->nv", z, e, precision=_HI)


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest code for each row of z (..., C); ties go to the lowest index (torch.argmin)."""
    lead = z.shape[:-1]
    d = code_distances(z.reshape(-1, z.shape[-1]), codebook)
    return jnp.argmin(d, axis=-1).astype(jnp.int32).reshape(lead)


def nearest_code_cosine(z: jax.Array, codebook: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Nearest code by cosine similarity (VAR's `using_znorm=True`, MaskGIT-style l2-normalised lookup)."""
    def normalize(x):
        x = x.astype(jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    lead = z.shape[:-1]
    sim = jnp.einsum("nc,vc->nv", normalize(z.reshape(-1, z.shape[-1])), normalize(codebook), precision=_HI)
    return jnp.argmax(sim, axis=-1).astype(jnp.int32).reshape(lead)


def lookup(codebook: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take(codebook, idx, axis=0)


def straight_through(x: jax.Array, q: jax.Array) -> jax.Array:
    """Forward value q, gradient of identity w.r.t. x."""
    return x + jax.lax.stop_gradient(q.astype(x.dtype) - x)


def commitment_loss(z: jax.Array, q: jax.Array, beta: float = 0.25, beta_on: str = "encoder") -> jax.Array:
    """beta * |sg(q) - z|^2 (pulls the encoder) + |q - sg(z)|^2 (pulls the codebook), means over elements, float32.

    beta_on='codebook' moves beta to the other term, |sg(q) - z|^2 + beta * |q - sg(z)|^2, as MaskGIT-VQGAN's
    quantizer does (the two terms have the same value, so only the gradients differ).
    """
    if beta_on not in ("encoder", "codebook"):
        raise ValueError(f"commitment_loss: beta_on must be 'encoder' or 'codebook', got {beta_on!r}")
    z = z.astype(jnp.float32)
    q = q.astype(jnp.float32)
    if beta_on == "codebook":
        return (jnp.mean(jnp.square(jax.lax.stop_gradient(q) - z))
                + beta * jnp.mean(jnp.square(q - jax.lax.stop_gradient(z))))
    return (beta * jnp.mean(jnp.square(jax.lax.stop_gradient(q) - z))
            + jnp.mean(jnp.square(q - jax.lax.stop_gradient(z))))


def code_counts(idx: jax.Array, vocab_size: int) -> jax.Array:
    """How often each code was chosen (V,) float32 (torch bincount(minlength=V))."""
    return jnp.zeros((vocab_size,), jnp.float32).at[idx.reshape(-1)].add(1.0)


def usage_fraction(counts: jax.Array, margin: float = 0.0) -> jax.Array:
    """Fraction of codes whose (possibly EMA) hit count exceeds `margin` (counts (..., V) -> (...))."""
    return jnp.mean((counts > margin).astype(jnp.float32), axis=-1)


def perplexity(counts: jax.Array) -> jax.Array:
    p = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
    return jnp.exp(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-10)), axis=-1))


def update_usage_ema(ema: jax.Array, counts: jax.Array, decay: float = 0.99) -> jax.Array:
    return decay * ema + (1.0 - decay) * counts


def dead_code_loss(codebook: jax.Array, counts: jax.Array, candidates: jax.Array, anchor_key: jax.Array) -> jax.Array:
    """Stateless dead-code policy: every code unused in this batch (count 0) is pulled towards a data point, so it
    re-enters the data distribution instead of staying dead. Works inside a pure loss (no usage state needed).

    Each code i owns a fixed anchor direction e_i ~ N(0, I) drawn from `anchor_key` (pass the SAME key every step);
    its anchor is mean + std * e_i of this batch's candidates, and its target the candidate nearest that anchor
    (stop-gradient). Fixed anchors keep each dead code's target in the same region from step to step, so an optimizer
    moves it there steadily, and different codes head for different regions (targets re-drawn at random every step
    would drag all dead codes to the candidates' mean, where at most one of them wins assignments).
    Returns the mean squared pull over the dead codes (0 when every code was used); add it with a small weight.
    candidates: (..., C) what the codebook has to cover (e.g. the quantiser inputs of the batch).
    """
    cand = jax.lax.stop_gradient(candidates.reshape(-1, candidates.shape[-1]).astype(jnp.float32))
    mean, std = jnp.mean(cand, axis=0), jnp.std(cand, axis=0)
    anchors = mean + std * jax.random.normal(anchor_key, codebook.shape, jnp.float32)
    target = cand[jnp.argmin(code_distances(anchors, cand), axis=-1)]
    dead = (counts <= 0).astype(jnp.float32)
    per_code = jnp.mean(jnp.square(codebook.astype(jnp.float32) - target), axis=-1)
    return jnp.sum(dead * per_code) / jnp.maximum(jnp.sum(dead), 1.0)


def reinit_dead_codes(codebook: jax.Array, usage: jax.Array, candidates: jax.Array, rng: jax.Array,
                      threshold: float = 1e-3) -> Tuple[jax.Array, jax.Array]:
    """Hard restart (for callers that keep usage state): replace codes whose usage EMA is below `threshold` by
    randomly drawn encoder features. Returns (new_codebook, dead_mask)."""
    cand = candidates.reshape(-1, candidates.shape[-1]).astype(codebook.dtype)
    pick = jax.random.randint(rng, (codebook.shape[0],), 0, cand.shape[0])
    dead = usage < threshold
    return jnp.where(dead[:, None], cand[pick], codebook), dead
