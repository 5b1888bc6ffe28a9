"""The decode loop every sampler runs: a state pytree through ONE compiled step inside `lax.fori_loop`.

    state = decode_loop(step_fn, state, num_steps, tables)

`tables` are per-step constants (schedules, guidance scales) as arrays with a leading step axis; `step_fn(k, state,
row)` gets row k of each. The step is traced once, whatever num_steps is, and nothing returns to the host.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp


def decode_loop(step_fn: Callable[[jax.Array, Any, Any], Any], state: Any, num_steps: int,
                tables: Optional[Any] = None, unroll: int = 1) -> Any:
    tables = {} if tables is None else jax.tree_util.tree_map(jnp.asarray, tables)

    def body(k, s):
        return step_fn(k, s, jax.tree_util.tree_map(lambda t: t[k], tables))

    return jax.lax.fori_loop(0, int(num_steps), body, state, unroll=unroll)
