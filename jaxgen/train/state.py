"""Train state: everything a bit-exact resume needs lives here (plus the data iterator, saved beside it)."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    ema_params: Any  # same tree as params, or None when EMA is off
    opt_state: Any
    rng: jax.Array  # raw uint32 key; each step uses fold_in(rng, step), so resume reproduces the draws
    # First step whose loss or gradients were not finite (-1: none). Updates are skipped from then on, so the
    # state stays the last good one and the host can halt at its next sync point without a per-step sync.
    nonfinite_step: jax.Array


def create(params, ema: bool, tx, seed_key) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else None,
        opt_state=tx.init(params),
        rng=seed_key,
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )
