"""jaxgen.nn.kernel_layout: out-major kernel copies made outside a loop, viewed in-major inside it."""
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.nn import kernel_layout


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {"head": {"mlp_0": {"kernel": jax.random.normal(k[0], (8, 6)), "bias": jnp.zeros(6)},
                     "ada_ln": {"kernel": jax.random.normal(k[1], (8, 12))}},
            "mlp_0": {"kernel": jax.random.normal(k[2], (6, 8))}}


def test_selection_roundtrip_and_idempotence():
    params = _params()
    select = kernel_layout.dense_kernels(("mlp_0",), within="head")
    out = kernel_layout.to_out_major(params, select)
    assert isinstance(out["head"]["mlp_0"]["kernel"], kernel_layout.OutMajor)
    assert out["head"]["mlp_0"]["kernel"].transposed.shape == (6, 8)
    # not selected: the bias, another module, the same module name outside `within`
    assert out["head"]["mlp_0"]["bias"] is params["head"]["mlp_0"]["bias"]
    assert out["head"]["ada_ln"]["kernel"] is params["head"]["ada_ln"]["kernel"]
    assert out["mlp_0"]["kernel"] is params["mlp_0"]["kernel"]
    again = kernel_layout.to_out_major(out, select)
    assert again["head"]["mlp_0"]["kernel"] is out["head"]["mlp_0"]["kernel"]
    back = kernel_layout.in_major(out)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)


def test_loop_reads_the_out_major_copy():
    """The copy is made once outside the loop; inside it the dot contracts the copy's minor dim (no transpose)."""
    params = _params()
    select = kernel_layout.dense_kernels(("mlp_0",), within="head")
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 8))

    def run(params, x, prepare):
        prepared = kernel_layout.to_out_major(params, select) if prepare else params

        def body(i, h):
            w = kernel_layout.in_major(prepared)["head"]["mlp_0"]["kernel"]
            return jnp.tanh(jnp.dot(h, w)) @ params["mlp_0"]["kernel"]
        return jax.lax.fori_loop(0, 3, body, x)

    ours = jax.jit(run, static_argnums=2)
    # the same products up to float32 summation order (the two layouts' dots sum in different orders: 3e-6 apart
    # after three tanh layers on the AMD EPYC VM)
    np.testing.assert_allclose(np.asarray(ours(params, x, True)), np.asarray(ours(params, x, False)),
                               rtol=1e-5, atol=1e-5)
    hlo = ours.lower(params, x, True).compile().as_text()
    dims = re.findall(r"f32\[16,6\]\{1,0\} dot\([^)]*\), lhs_contracting_dims=\{1\}, rhs_contracting_dims=\{(\d)\}",
                      hlo)
    assert dims and set(dims) == {"1"}, dims  # reads the (6, 8) copy along its minor dim


def test_wanted_needs_rows_and_cpu():
    assert kernel_layout.wanted(kernel_layout.MIN_ROWS) == (jax.default_backend() == "cpu")
    assert not kernel_layout.wanted(kernel_layout.MIN_ROWS - 1)


def _dense_with_out_major_copy():
    """A 64 -> 64 Dense, its params, and the same params with the kernel stored out-major (`OutMajor`)."""
    import flax.linen as nn

    from jaxgen.nn.layers import Dense

    layer = Dense(64, axes=("embed", "mlp"))
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), jnp.ones((1, 64))))
    prepared = {"params": {"kernel": kernel_layout.OutMajor(params["params"]["kernel"].T),
                           "bias": params["params"]["bias"]}}
    return layer, params, prepared


def test_dense_reads_out_major_views_through_xlas_dot_without_copies():
    """Traced under `out_major_views`, Dense leaves BLAS / the few-row kernel alone: they take (in, out) operands, so
    XLA would copy the viewed kernel back at every loop step (MAR-B's head at 24+ rows: 2x slower DDPM steps).
    `matmul_wt` reads the stored (out, in) copy itself."""
    from jaxgen.kernels import cpu as cpu_kernels

    layer, params, prepared = _dense_with_out_major_copy()
    x = jnp.ones((32, 64))  # <= MAX_ROWS: `matmul` on in-major kernels

    def run(views):
        def loop(prepared, h):
            def body(i, h):
                variables = kernel_layout.in_major(prepared)
                if not views:
                    return layer.apply(variables, h)
                with kernel_layout.out_major_views():
                    return layer.apply(variables, h)
            return jax.lax.fori_loop(0, 2, body, h)
        return jax.jit(loop).lower(prepared, x).compile().as_text()

    assert cpu_kernels.available() and cpu_kernels.wanted(32, jnp.float32, jnp.float32)
    without = run(views=False)  # the copy this guards against: a transposed kernel feeding the row-major kernel
    assert cpu_kernels.GEMV in without and re.search(r"= f32\[64,64\]\{1,0\} (transpose|copy|fusion)", without)
    with_views = run(views=True)
    assert cpu_kernels.GEMV not in with_views and cpu_kernels.GEMM_WT in with_views  # reads the stored copy
    assert not re.search(r"= f32\[64,64\]\{1,0\} (transpose|copy|fusion)", with_views)
    assert not kernel_layout.tracing_views()


def test_dense_reads_out_major_views_through_blas_at_many_rows_without_copies():
    """From BLAS_MIN_ROWS rows (small kernels: mar_tiny's head at batch 250) Dense hands the stored (out, in) copy to
    BLAS to read transposed (`gemm_wt`) instead of XLA's dot on the view, with no copy of the kernel in the loop."""
    from jaxgen.kernels import cpu as cpu_kernels

    layer, params, prepared = _dense_with_out_major_copy()
    rows = cpu_kernels.BLAS_MIN_ROWS + 36
    x = jax.random.normal(jax.random.PRNGKey(1), (rows, 64))

    def loop(prepared, h):
        def body(i, h):
            with kernel_layout.out_major_views():
                return layer.apply(kernel_layout.in_major(prepared), h)
        return jax.lax.fori_loop(0, 2, body, h)

    assert cpu_kernels.wanted_gemm(rows, jnp.float32, jnp.float32, 64 * 64)
    hlo = jax.jit(loop).lower(prepared, x).compile().as_text()
    assert cpu_kernels.BLAS_GEMM in hlo and cpu_kernels.GEMM_WT not in hlo
    assert not re.search(r"= f32\[64,64\]\{1,0\} (transpose|copy|fusion)", hlo)
    want = jax.jit(lambda p, h: jax.lax.fori_loop(0, 2, lambda i, h: layer.apply(params, h), h))(params, x)
    np.testing.assert_allclose(jax.jit(loop)(prepared, x), want, rtol=1e-5, atol=1e-5)
