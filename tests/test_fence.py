"""gradient_fence (jaxgen.nn.fence): identity forward and backward, and on XLA:CPU it keeps the backward of a deep
residual LayerNorm stack from recomputing the whole gradient chain inside every fusion."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.nn.fence import gradient_fence


def _stack(params, x, fence):
    for w, gate in params:
        mu = x.mean(-1, keepdims=True)
        h = (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
        x = x + gate * jnp.tanh(h @ w)
        if fence:
            x = gradient_fence(x)
    return jnp.sum(x ** 2)


def _largest_fusion(compiled_text):
    bodies = re.findall(r"\n%fused_computation[^\n]*\{\n(.*?)\n\}", compiled_text, re.S)
    return max(b.count("\n") + 1 for b in bodies)


def test_identity_values_and_gradients():
    rng = np.random.default_rng(0)
    params = [(jnp.asarray(rng.standard_normal((64, 64)) * 0.1, jnp.float32),
               jnp.asarray(rng.standard_normal(64), jnp.float32)) for _ in range(12)]
    x = jnp.asarray(rng.standard_normal((8, 16, 64)), jnp.float32)
    assert np.array_equal(np.asarray(gradient_fence(x)), np.asarray(x))
    grads = [jax.jit(jax.grad(_stack, argnums=(0, 1)), static_argnums=2)(params, x, f) for f in (False, True)]
    for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
        a, b = np.asarray(a), np.asarray(b)  # fusion changes the summation order: f32 rounding only
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    # with the fence the cotangent passes a conditional and the largest fusion no longer grows with depth
    plain, fenced = (jax.jit(jax.grad(_stack, argnums=(0, 1)), static_argnums=2).lower(params, x, f).compile()
                     .as_text() for f in (False, True))
    assert "conditional" in fenced and "conditional" not in plain
    assert _largest_fusion(fenced) <= _largest_fusion(plain)
