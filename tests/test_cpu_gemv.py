"""The few-row CPU matmul kernel (jaxgen/kernels/cpu_gemv.cc): built on this machine, the same product as a float64
reference for every row count and ragged sizes, gradients, the Dense dispatch, and the fallback without a kernel."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.kernels import cpu_gemv
from jaxgen.nn.layers import Dense


def test_kernel_builds_here():
    # CI's machine has a C++ compiler: the kernel must be what Dense uses there, not a silent fallback
    assert cpu_gemv.available(), cpu_gemv._state.get("why")


@pytest.mark.parametrize("rows,k,n", [(1, 5, 3), (2, 64, 16), (3, 130, 70), (4, 768, 256), (5, 200, 1000),
                                      (8, 257, 129), (9, 100, 33), (16, 64, 48)])
def test_product_matches_float64(rows, k, n):
    rng = np.random.default_rng(rows * 1000 + k)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_gemv.matmul)(x, w))
    ref = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4 * np.sqrt(k))


def test_gradients_are_the_plain_matmul_ones():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 96)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((96, 40)), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    got = jax.grad(loss(cpu_gemv.matmul), argnums=(0, 1))(x, w)
    ref = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dense_uses_the_kernel_for_few_float32_rows_only():
    layer = Dense(24, axes=("embed", "mlp"))
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), jnp.ones((1, 16))))

    def lowered(rows, dtype=jnp.float32):
        fn = jax.jit(lambda p, x: layer.apply(p, x))
        return fn.lower(params, jnp.ones((rows, 16), dtype)).as_text()

    assert cpu_gemv.TARGET in lowered(1) and cpu_gemv.TARGET in lowered(cpu_gemv.MAX_ROWS)
    assert cpu_gemv.TARGET not in lowered(cpu_gemv.MAX_ROWS + 1)
    bf16 = Dense(24, axes=("embed", "mlp"), dtype=jnp.bfloat16)
    text = jax.jit(lambda p, x: bf16.apply(p, x)).lower(params, jnp.ones((2, 16))).as_text()
    assert cpu_gemv.TARGET not in text
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 16))  # leading dims flattened to 6 rows
    np.testing.assert_allclose(layer.apply(params, x), x @ params["params"]["kernel"] + params["params"]["bias"],
                               rtol=1e-5, atol=1e-5)


def test_without_a_kernel_dense_keeps_xlas_dot(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "_state", {"ok": False, "why": "test"})
    assert not cpu_gemv.wanted(2, jnp.float32, jnp.float32)
    layer = Dense(8, axes=("embed", "mlp"))
    params = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
    text = jax.jit(lambda p, x: layer.apply(p, x)).lower(params, jnp.ones((2, 4))).as_text()
    assert cpu_gemv.TARGET not in text
    with pytest.raises(RuntimeError, match="not available"):
        cpu_gemv.matmul(jnp.ones((2, 4)), jnp.ones((4, 8)))


def test_opt_out_and_a_missing_compiler_fall_back_with_a_reason(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "_state", {})
    monkeypatch.setenv(cpu_gemv.OPT_OUT, "0")
    assert not cpu_gemv.available() and "JAXGEN_CPU_GEMV=0" in cpu_gemv._state["why"]
    monkeypatch.setattr(cpu_gemv, "_state", {})
    monkeypatch.delenv(cpu_gemv.OPT_OUT)
    monkeypatch.setattr(cpu_gemv, "_compiler", lambda: None)
    assert not cpu_gemv.available() and "compiler" in cpu_gemv._state["why"]


def test_vmap_over_the_kernel():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 2, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((32, 20)), jnp.float32)
    got = jax.vmap(cpu_gemv.matmul, in_axes=(0, None))(x, w)
    np.testing.assert_allclose(got, jnp.einsum("bmk,kn->bmn", x, w), rtol=1e-5, atol=1e-5)


def test_under_a_one_device_mesh():
    from jax.sharding import Mesh

    layer = Dense(8, axes=("embed", "mlp"))
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), jnp.ones((1, 4))))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    with jax.set_mesh(mesh), nn.logical_axis_rules((("embed", None), ("mlp", None))):
        out = jax.jit(lambda p, x: layer.apply(p, x))(params, jnp.ones((2, 4)))
    np.testing.assert_allclose(out, jnp.ones((2, 4)) @ params["params"]["kernel"] + params["params"]["bias"],
                               rtol=1e-5, atol=1e-5)


def test_builds_into_an_empty_cache(tmp_path, monkeypatch):
    """What a fresh machine does on first use: compile cpu_gemv.cc into the cache (then reuse the file)."""
    monkeypatch.setenv("JAXGEN_CACHE_DIR", str(tmp_path))
    compiler = cpu_gemv._compiler()
    assert compiler is not None
    path = cpu_gemv.build(compiler)
    built = tmp_path / "kernels" / path.rsplit("/", 1)[-1]
    assert path == str(built) and path.endswith(".so")
    stamp = built.stat().st_mtime_ns
    assert cpu_gemv.build(compiler) == path and built.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary file left behind
