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


def test_gelu_tanh_is_torchs_formula_and_its_gradient_keeps_only_the_input():
    import math

    from jaxgen.nn.layers import _gelu_tanh, gelu_tanh

    x = np.linspace(-12.0, 12.0, 4001)
    th = np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))
    slope = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * math.sqrt(2.0 / math.pi) * (1.0 + 3 * 0.044715 * x * x)
    x32 = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(np.asarray(gelu_tanh(x32)), 0.5 * x * (1.0 + th), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(gelu_tanh))(x32)), slope, rtol=1e-5, atol=5e-6)
    # what a training step keeps: in a stack of MLPs, one array of the hidden width less per layer than autodiff
    # of the same formula (whose backward XLA fed from tanh and a product kept since the forward)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
    weights = [(jnp.asarray(rng.standard_normal((128, 512)) * 0.05, jnp.float32),
                jnp.asarray(rng.standard_normal((512, 128)) * 0.05, jnp.float32)) for _ in range(4)]

    def temp_bytes(act):
        def loss(weights, x):
            for w1, w2 in weights:
                x = x + jnp.dot(act(jnp.dot(x, w1)), w2)
            return jnp.sum(x ** 2)
        return jax.jit(jax.grad(loss)).lower(weights, x).compile().memory_analysis().temp_size_in_bytes

    hidden_bytes = 256 * 512 * 4
    assert temp_bytes(gelu_tanh) <= temp_bytes(_gelu_tanh) - 2 * hidden_bytes


def test_layer_norm_gradient_from_its_output_is_autodiffs():
    """`normalize` (LayerNorm without its affine) writes its gradient from the output and 1 / std; it is the
    gradient of the plain formula, also for inputs far from zero mean / unit scale."""
    from jaxgen.nn.layers import LayerNorm, normalize

    def plain(x, eps):
        centred = x - jnp.mean(x, axis=-1, keepdims=True)
        return centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)

    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 100.0):
        x = jnp.asarray(rng.standard_normal((6, 5, 48)) * scale + 3.0 * scale, jnp.float32)
        g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
        np.testing.assert_allclose(normalize(x, 1e-6), plain(x, 1e-6), atol=1e-6)
        got = jax.vjp(lambda x: normalize(x, 1e-6), x)[1](g)[0]
        want = jax.vjp(lambda x: plain(x, 1e-6), x)[1](g)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(want))))
    ln = LayerNorm(1e-6)
    params = ln.init(jax.random.PRNGKey(0), x)
    grads = jax.grad(lambda p, x: jnp.sum(jnp.sin(ln.apply(p, x))), (0, 1))(params, x)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(grads))
