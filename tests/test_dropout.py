"""The shared hash-based dropout (jaxgen.nn.dropout): Bernoulli(1 - rate) per element, independent across elements
and keys, inverted scaling, and the linen module's contract (identity when deterministic, 'dropout' rng)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.nn.dropout import Dropout, dropout, keep_mask


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_and_independence(rate):
    shape = (4, 8, 64, 64)
    a = np.asarray(keep_mask(jax.random.PRNGKey(0), rate, shape)).astype(np.float64)
    b = np.asarray(keep_mask(jax.random.PRNGKey(1), rate, shape)).astype(np.float64)
    n = a.size
    tol = 5 * np.sqrt(rate * (1 - rate) / n)  # 5 sigma
    assert abs(a.mean() - (1 - rate)) < tol
    for x, y in [(a.ravel(), b.ravel()), (a[..., 1:].ravel(), a[..., :-1].ravel()), (a[1].ravel(), a[0].ravel())]:
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.01


def test_inverted_scaling_and_module():
    x = jnp.ones((2, 1000))
    y = np.asarray(dropout(x, 0.25, jax.random.PRNGKey(3)))
    np.testing.assert_allclose(np.unique(y), [0.0, 1.0 / 0.75], rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.05
    mod = Dropout(0.25)
    assert np.array_equal(np.asarray(mod.apply({}, x, deterministic=True)), np.asarray(x))
    z1 = mod.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(4)})
    z2 = mod.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(5)})
    assert not np.array_equal(np.asarray(z1), np.asarray(z2))
    with pytest.raises(ValueError):
        keep_mask(jax.random.PRNGKey(0), 1.0, (3,))
