"""Token sampling from logits: temperature, top-k / top-p filtering (the official VAR semantics), categorical draws."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.sampling.guidance import is_static


def top_k_top_p_filter(logits: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
    """Official VAR `sample_with_top_k_top_p_` masking (returns the logits with removed entries at -inf).

    top_k > 0: drop every logit strictly below the k-th largest (ties with it are kept).
    top_p > 0: sort ascending, drop tokens whose ascending cumulative probability is <= 1 - top_p; the top token
    always stays.
    """
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(int(top_k), v))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if not is_static(top_p) or top_p > 0:  # a traced top_p (policy search) keeps the filter on
        order = jnp.argsort(logits, axis=-1)  # ascending
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        remove_sorted = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) <= (1.0 - top_p)
        remove_sorted = remove_sorted.at[..., -1].set(False)
        remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def sample_tokens(rng: jax.Array, logits: jax.Array, top_k: int = 0, top_p: float = 0.0, temperature=1.0):
    """(filtered logits, sampled ids int32) for logits (..., V): logits / temperature, then top-k / top-p, then a
    categorical draw (top_k == 1 is the deterministic argmax). `temperature` may be traced."""
    logits = logits.astype(jnp.float32) / temperature
    filtered = top_k_top_p_filter(logits, top_k, top_p)
    if top_k == 1:
        return filtered, jnp.argmax(filtered, axis=-1).astype(jnp.int32)  # deterministic: the single survivor
    return filtered, jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
