"""`gradient_fence`: identity whose cotangent is materialised once, for deep residual stacks on XLA:CPU.

Why: in the backward pass of a residual stack the gradient of the residual stream is a chain of cheap elementwise
ops (LayerNorm backward, adds, gates) between the dots. XLA:CPU's fusion duplicates cheap producers into every
consumer, so each block's backward fusions recompute that chain back to the last materialised value: work quadratic
in depth (RAR-B: fusions of 1,500 HLO ops taking 30-70 ms each where 2 ms would do, ~2.5 s of a 16 s train step).
`jax.lax.optimization_barrier` does not stop it (XLA:CPU expands barriers before fusion); a conditional does, so
the cotangent passes through a `lax.cond` whose predicate XLA cannot fold (always true at run time). Forward values
and gradients are unchanged. On other backends the conditional would cost a device-to-host sync per block, so
`gradient_fence` is a no-op there (decided at trace time, like the attention implementation).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _fence(x):
    return x


def _fence_fwd(x):
    # Always true, but XLA cannot prove it (bit pattern | 1 != 0), so the conditional stays in the program.
    first = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.uint32)
    return x, (first | jnp.uint32(1)) != 0


def _fence_bwd(always_true, g):
    return (jax.lax.cond(always_true, lambda t: t, jnp.zeros_like, g),)


_fence.defvjp(_fence_fwd, _fence_bwd)


def gradient_fence(x: jax.Array) -> jax.Array:
    """x unchanged; on CPU its cotangent is materialised (see the module docstring), elsewhere a no-op."""
    if jax.default_backend() != "cpu" or x.size == 0:
        return x
    return _fence(x)
