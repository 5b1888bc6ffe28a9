"""jaxgen.nn.conv: the sub-pixel nearest-x2 + 3x3 conv equals upsampling then convolving (the torch order); SiLU in
torch's form (`jaxgen.nn.layers.silu`) with a finite gradient."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.nn.conv import Conv, Upsample, nearest_up2_conv3


def _reference(x, kernel):
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return jax.lax.conv_general_dilated(up, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 4, 4, 8)])
def test_subpixel_form_matches_upsample_then_conv(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 6)), jnp.float32)
    ours = nearest_up2_conv3(x, kernel)
    assert ours.shape == (shape[0], 2 * shape[1], 2 * shape[2], 6)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(_reference(x, kernel)), rtol=1e-5, atol=1e-5)


def test_upsample_module_keeps_its_params_and_numbers():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3, 3, 4)), jnp.float32)
    mod = Upsample()
    params = nn.meta.unbox(mod.init(jax.random.PRNGKey(0), x)["params"])
    assert params["conv"]["kernel"].shape == (3, 3, 4, 4)  # the torch `conv` weight, unchanged layout
    want = _reference(x, params["conv"]["kernel"]) + params["conv"]["bias"]
    np.testing.assert_allclose(np.asarray(mod.apply({"params": params}, x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    plain = Upsample(with_conv=False).apply({}, x)
    np.testing.assert_array_equal(np.asarray(plain), np.repeat(np.repeat(np.asarray(x), 2, 1), 2, 2))


def test_upsample_flag_needs_a_3x3_same_conv():
    with pytest.raises(ValueError, match="3x3 conv with stride 1 and padding 1"):
        Conv(4, 1, upsample_nearest2=True).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 4)))


def test_silu_is_torchs_formula_with_a_finite_gradient_everywhere():
    from jaxgen.nn.layers import silu

    x = np.linspace(-120.0, 120.0, 20001).astype(np.float32)
    reference = x.astype(np.float64) / (1.0 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(np.asarray(silu(jnp.asarray(x))), reference, rtol=2e-7, atol=1e-30)
    grad = np.asarray(jax.vmap(jax.grad(silu))(jnp.asarray(x)))
    reference_grad = np.asarray(jax.vmap(jax.grad(jax.nn.silu))(jnp.asarray(x)))
    assert np.isfinite(grad).all()  # autodiff of x / (1 + exp(-x)) would give inf / inf below x = -88
    np.testing.assert_allclose(grad, reference_grad, atol=1e-6)
    assert float(jax.grad(silu)(-100.0)) == 0.0
