"""jaxgen's CPU kernels (jaxgen/kernels/cpu.cc): built on this machine; the few-row matmul against a float64
reference for every row count and ragged sizes, concurrent callers, its gradients and the Dense dispatch; the
KV-cache decode attention against the masked full-cache attention and the Attention dispatch; the many-query
attention (key masks, ragged sizes, the backward kernel); the BLAS matmul (transposes, gradients, Dense
dispatch); the fallback without kernels."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.kernels import cpu as cpu_kernels
from jaxgen.nn.layers import Dense


def test_kernel_builds_here():
    # the install (README) expects a C++ compiler; jaxgen falls back to XLA's ops without one (tested below), but
    # here the kernels must be what Dense / Attention use, not a silent fallback
    assert cpu_kernels.available(), cpu_kernels._state.get("why")


@pytest.mark.parametrize("rows,k,n", [(1, 5, 3), (2, 64, 16), (3, 130, 70), (4, 768, 256), (5, 200, 1000),
                                      (8, 257, 129), (9, 100, 33), (16, 64, 48),
                                      # the register-tiled path above 8 rows: row tiles and their rest, columns
                                      # past the last two-vector block, several L2 chunks of the kernel
                                      (13, 300, 100), (37, 1000, 70), (63, 2100, 96)])
def test_product_matches_float64(rows, k, n):
    rng = np.random.default_rng(rows * 1000 + k)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_kernels.matmul)(x, w))
    ref = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4 * np.sqrt(k))


def test_concurrent_callers_share_the_decode_helpers_correctly():
    # the kernels' own spinning helpers take one caller's job at a time; a concurrent caller (here: two Python
    # threads running jitted decode-sized products) falls back to XLA's pool. Every result must stay exact.
    import concurrent.futures

    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((4, 768)).astype(np.float32) for _ in range(2)]
    ws = [rng.standard_normal((768, 512)).astype(np.float32) for _ in range(2)]
    refs = [x.astype(np.float64) @ w.astype(np.float64) for x, w in zip(xs, ws)]
    chain = jax.jit(lambda x, w: [cpu_kernels.matmul(x * float(i + 1), w) for i in range(20)])  # 20 distinct calls

    def run(i):
        return [np.asarray(y) for y in chain(xs[i], ws[i])]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            for i, outs in enumerate(pool.map(run, [0, 1])):
                for scale, y in enumerate(outs, 1):
                    np.testing.assert_allclose(y, scale * refs[i], rtol=1e-5, atol=scale * 1e-4 * np.sqrt(768))


def test_gradients_are_the_plain_matmul_ones():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 96)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((96, 40)), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(jnp.sin(f(x, w)))

    got = jax.grad(loss(cpu_kernels.matmul), argnums=(0, 1))(x, w)
    ref = jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dense_uses_the_kernel_for_few_float32_rows_only():
    layer = Dense(24, axes=("embed", "mlp"))
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), jnp.ones((1, 16))))

    def lowered(rows, dtype=jnp.float32):
        fn = jax.jit(lambda p, x: layer.apply(p, x))
        return fn.lower(params, jnp.ones((rows, 16), dtype)).as_text()

    assert cpu_kernels.GEMV in lowered(1) and cpu_kernels.GEMV in lowered(cpu_kernels.MAX_ROWS)
    assert cpu_kernels.GEMV not in lowered(cpu_kernels.MAX_ROWS + 1)
    bf16 = Dense(24, axes=("embed", "mlp"), dtype=jnp.bfloat16)
    text = jax.jit(lambda p, x: bf16.apply(p, x)).lower(params, jnp.ones((2, 16))).as_text()
    assert cpu_kernels.GEMV not in text
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 16))  # leading dims flattened to 6 rows
    np.testing.assert_allclose(layer.apply(params, x), x @ params["params"]["kernel"] + params["params"]["bias"],
                               rtol=1e-5, atol=1e-5)


def test_without_a_kernel_dense_keeps_xlas_dot(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {"ok": False, "why": "test"})
    assert not cpu_kernels.wanted(2, jnp.float32, jnp.float32)
    layer = Dense(8, axes=("embed", "mlp"))
    params = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
    text = jax.jit(lambda p, x: layer.apply(p, x)).lower(params, jnp.ones((2, 4))).as_text()
    assert cpu_kernels.GEMV not in text
    with pytest.raises(RuntimeError, match="not available"):
        cpu_kernels.matmul(jnp.ones((2, 4)), jnp.ones((4, 8)))


def test_opt_out_and_a_missing_compiler_fall_back_with_a_reason(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv(cpu_kernels.OPT_OUT, "0")
    assert not cpu_kernels.available() and "JAXGEN_CPU_KERNELS=0" in cpu_kernels._state["why"]
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.delenv(cpu_kernels.OPT_OUT)
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    assert not cpu_kernels.available() and "compiler" in cpu_kernels._state["why"]


def test_vmap_over_the_kernel():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 2, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((32, 20)), jnp.float32)
    got = jax.vmap(cpu_kernels.matmul, in_axes=(0, None))(x, w)
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
    """What a fresh machine does on first use: compile cpu.cc into the cache (then reuse the file)."""
    monkeypatch.setenv("JAXGEN_CACHE_DIR", str(tmp_path))
    compiler = cpu_kernels._compiler()
    assert compiler is not None
    path = cpu_kernels.build(compiler)
    built = tmp_path / "kernels" / path.rsplit("/", 1)[-1]
    assert path == str(built) and path.endswith(".so")
    stamp = built.stat().st_mtime_ns
    assert cpu_kernels.build(compiler) == path and built.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary file left behind


@pytest.mark.parametrize("length,h", [(1, 24), (7, 24), (20, 24), (17, 64), (33, 64), (40, 200), (9, 136)])
def test_decode_attention_is_the_masked_full_cache_attention(length, h):
    """Lengths on and off the kernel's 16-slot vectors, head sizes with and without a scalar tail, and over one
    register block of output columns (its prefetch chain running from keys to values to the next pair's keys)."""
    from jaxgen.nn.attention import dot_product_attention

    rng = np.random.default_rng(length)
    b, n, s = 2, 3, 40
    q = jnp.asarray(rng.standard_normal((b, 1, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, n, s, h)), jnp.float32) for _ in range(2))
    got = jax.jit(lambda q, k, v, n: cpu_kernels.decode_attention(q, k, v, n, h ** -0.5))(q, k, v, length)
    ref = dot_product_attention(q, k, v, mask=(jnp.arange(s) < length)[None, None, None], kv_layout="BNSH")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_attention_decode_steps_use_the_kernel_and_match_xla(monkeypatch):
    from jaxgen.nn.attention import Attention, KVCache

    attn = Attention(32, 4)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 32))
    params = nn.meta.unbox(attn.init(jax.random.PRNGKey(1), x[:, :1]))

    def decode(p, x):  # prefill 3 tokens, then 3 one-token steps
        cache = KVCache.zeros(2, 4, 8, 8)
        out, cache = attn.apply(p, x[:, :3], cache=cache, cache_index=0)
        outs = [out]
        for i in range(3, 6):
            out, cache = attn.apply(p, x[:, i:i + 1], cache=cache, cache_index=i)
            outs.append(out)
        return jnp.concatenate(outs, axis=1)

    assert cpu_kernels.DECODE_ATTENTION in jax.jit(decode).lower(params, x).as_text()
    with_kernel = jax.jit(decode)(params, x)
    monkeypatch.setattr(cpu_kernels, "_state", {"ok": False, "why": "test"})
    fallback = jax.jit(lambda p, x: decode(p, x))  # a new function: traced again
    assert cpu_kernels.DECODE_ATTENTION not in fallback.lower(params, x).as_text()
    np.testing.assert_allclose(with_kernel, fallback(params, x), rtol=1e-5, atol=1e-5)
    full = attn.apply(params, x, mask=jnp.tril(jnp.ones((6, 6), bool)))  # the same causal attention in one pass
    np.testing.assert_allclose(with_kernel, full, rtol=1e-5, atol=1e-5)


def _visible(keep):
    """keep (B, S) per key, or (B, T, S) per query and key -> broadcastable to (B, N, T, S)."""
    keep = np.asarray(keep)
    return keep[:, None, None, :] if keep.ndim == 2 else keep[:, None]


def _attention64(q, k, v, keep, scale):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    logits = np.where(_visible(keep), logits, np.finfo(np.float32).min)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnts,bsnh->btnh", w / w.sum(-1, keepdims=True), v)


def _attention64_grads(q, k, v, keep, scale, g):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    visible = _visible(keep)
    logits = np.where(visible, np.einsum("btnh,bsnh->bnts", q, k) * scale, np.finfo(np.float32).min)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    p = w / w.sum(-1, keepdims=True)
    gt = np.transpose(g, (0, 2, 1, 3))  # (B, N, T, H)
    dv = np.einsum("bnts,bnth->bsnh", p, gt)
    dp = np.einsum("bnth,bsnh->bnts", gt, v)
    ds = p * (dp - np.sum(p * dp, -1, keepdims=True)) * visible
    return (np.einsum("bnts,bsnh->btnh", ds, k) * scale, np.einsum("bnts,btnh->bsnh", ds, q) * scale, dv)


@pytest.mark.parametrize("b,t,s,n,h", [(1, 1, 1, 1, 8), (2, 7, 13, 3, 40), (2, 13, 33, 2, 64), (1, 25, 70, 4, 72)])
def test_attention_kernel_matches_float64(b, t, s, n, h):
    rng = np.random.default_rng(t * 100 + s)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((b, t, n, h), (b, s, n, h),
                                                                                  (b, s, n, h)))
    keep = rng.random((b, s)) > 0.3
    keep[0] = False  # a fully masked row: uniform over the real keys (padding keys never count)
    got = jax.jit(lambda q, k, v, m: cpu_kernels.attention(q, k, v, m, 0.3))(q, k, v, keep)
    np.testing.assert_allclose(got, _attention64(q, k, v, keep, 0.3), rtol=1e-5, atol=2e-6)
    # gradients against float64 ones (masked logits are constants, as in jaxgen's XLA formulation)
    g = rng.standard_normal(q.shape)
    _, pullback = jax.vjp(lambda q, k, v: cpu_kernels.attention(q, k, v, keep, 0.3), q, k, v)
    got = pullback(jnp.asarray(g, jnp.float32))
    ref = _attention64_grads(q, k, v, keep, 0.3, g)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunks,s", [(((3, 9), (9, 30), (30, 37)), 40), (((0, 13), (13, 14)), 14),
                                      (((5, 29),), 29)])
def test_prefix_chunk_attention_matches_float64(chunks, s):
    """Queries [a, b) see keys [0, b), in one kernel call over q, k, v as they are (no slices); rows outside the
    chunks get no gradient, keys after the last chunk none either. Chunk sizes off the kernel's tiles (12 x 32)."""
    rng = np.random.default_rng(s)
    q, k, v = (jnp.asarray(rng.standard_normal((2, s, 3, 24)), jnp.float32) for _ in range(3))
    first, last = chunks[0][0], chunks[-1][1]
    visible = np.zeros((2, s, s), bool)
    for a, b in chunks:
        visible[:, a:b, :b] = True
    fn = jax.jit(lambda q, k, v: cpu_kernels.prefix_chunk_attention(q, k, v, chunks, 0.4))
    got = fn(q, k, v)
    assert got.shape == (2, last - first, 3, 24)
    np.testing.assert_allclose(got, _attention64(q, k, v, visible, 0.4)[:, first:last], rtol=1e-5, atol=2e-6)
    lowered = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), (0, 1, 2))).lower(q, k, v).as_text()
    assert lowered.count(f"@{cpu_kernels.ATTENTION}(") == 1 and lowered.count(f"@{cpu_kernels.ATTENTION_BACKWARD}(") == 1
    g = np.zeros(q.shape)
    g[:, first:last] = rng.standard_normal((2, last - first, 3, 24))
    _, pullback = jax.vjp(lambda q, k, v: cpu_kernels.prefix_chunk_attention(q, k, v, chunks, 0.4), q, k, v)
    got = pullback(jnp.asarray(g[:, first:last], jnp.float32))
    visible[:, :first] = visible[:, last:] = True  # rows outside the chunks: any mask, their cotangent is zero
    for a, b in zip(got, _attention64_grads(q, k, v, visible, 0.4, g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_kernels.prefix_chunk_attention(q, k, v, ((0, 5), (6, 9)), 0.4)


def test_dot_product_attention_dispatch_and_gradients():
    from jaxgen.nn.attention import _normalize_last, dot_product_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 9, 3, 16)), jnp.float32) for _ in range(3))
    key_mask = jnp.asarray(rng.random((2, 1, 1, 9)) > 0.4)
    lowered = lambda mask: jax.jit(lambda q, k, v: dot_product_attention(q, k, v, mask)).lower(q, k, v).as_text()
    assert cpu_kernels.ATTENTION in lowered(None) and cpu_kernels.ATTENTION in lowered(key_mask)
    causal = jnp.tril(jnp.ones((9, 9), bool))[None, None]
    assert cpu_kernels.ATTENTION not in lowered(causal)  # masks over queries keep XLA's path
    for mask in (None, key_mask):
        got = dot_product_attention(q, k, v, mask)
        np.testing.assert_allclose(got, _normalize_last(q, k, v, mask, None, 0.25), rtol=1e-5, atol=1e-6)

        def loss(fn):
            return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

        grads = jax.grad(loss(lambda q, k, v: dot_product_attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
        ref = jax.grad(loss(lambda q, k, v: _normalize_last(q, k, v, mask, None, 0.25)), (0, 1, 2))(q, k, v)
        for a, b in zip(grads, ref):  # the backward kernel
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def test_blas_is_numpys_openblas_here():
    assert cpu_kernels.available() and cpu_kernels._state.get("blas"), cpu_kernels._state.get("blas_why")


@pytest.mark.parametrize("m,k,n", [(24, 5, 3), (37, 50, 70), (130, 64, 16), (64, 300, 200)])
def test_blas_gemm_and_its_gradients_match_float64(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    np.testing.assert_allclose(jax.jit(cpu_kernels.gemm)(x, w), x64 @ w64, rtol=1e-5, atol=1e-4 * np.sqrt(k))
    g = rng.standard_normal((m, n)).astype(np.float32)
    _, pullback = jax.vjp(cpu_kernels.gemm, x, w)
    gx, gw = pullback(jnp.asarray(g))
    np.testing.assert_allclose(gx, g.astype(np.float64) @ w64.T, rtol=1e-5, atol=1e-4 * np.sqrt(n))
    np.testing.assert_allclose(gw, x64.T @ g.astype(np.float64), rtol=1e-5, atol=1e-4 * np.sqrt(m))


@pytest.mark.parametrize("m,k,n", [(64, 5, 3), (130, 64, 16), (250, 300, 200)])
def test_blas_gemm_wt_reads_out_major_kernels_and_its_gradients_match_float64(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    wt = rng.standard_normal((n, k)).astype(np.float32)  # stored (out, in)
    x64, wt64 = x.astype(np.float64), wt.astype(np.float64)
    np.testing.assert_allclose(jax.jit(cpu_kernels.gemm_wt)(x, wt), x64 @ wt64.T, rtol=1e-5, atol=1e-4 * np.sqrt(k))
    g = rng.standard_normal((m, n)).astype(np.float32)
    _, pullback = jax.vjp(cpu_kernels.gemm_wt, x, wt)
    gx, gwt = pullback(jnp.asarray(g))
    np.testing.assert_allclose(gx, g.astype(np.float64) @ wt64, rtol=1e-5, atol=1e-4 * np.sqrt(n))
    np.testing.assert_allclose(gwt, g.astype(np.float64).T @ x64, rtol=1e-5, atol=1e-4 * np.sqrt(m))


def test_dense_uses_blas_from_blas_min_rows():
    layer = Dense(24, axes=("embed", "mlp"))
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), jnp.ones((1, 16))))

    def lowered(rows):
        return jax.jit(lambda p, x: layer.apply(p, x)).lower(params, jnp.ones((rows, 16))).as_text()

    assert cpu_kernels.BLAS_GEMM in lowered(cpu_kernels.BLAS_MIN_ROWS)
    assert cpu_kernels.BLAS_GEMM not in lowered(cpu_kernels.BLAS_MIN_ROWS - 1)
    assert cpu_kernels.BLAS_GEMM in lowered(cpu_kernels.XLA_DOT_ROWS[0])  # small weights: BLAS at every row count


def test_dense_keeps_xlas_dot_for_a_few_hundred_rows_of_large_weights():
    width = 768  # 768 x 768 >= XLA_DOT_MIN_SIZE
    layer = Dense(width, axes=("embed", "mlp"))
    abstract = jax.eval_shape(lambda: nn.meta.unbox(layer.init(jax.random.PRNGKey(0), jnp.ones((1, width)))))

    def lowered(rows):
        return jax.jit(lambda p, x: layer.apply(p, x)).lower(
            abstract, jax.ShapeDtypeStruct((rows, width), jnp.float32)).as_text()

    lo, hi = cpu_kernels.XLA_DOT_ROWS
    assert width * width >= cpu_kernels.XLA_DOT_MIN_SIZE
    assert cpu_kernels.GEMV in lowered(lo - 1) and cpu_kernels.BLAS_GEMM in lowered(hi)  # below: `matmul`
    assert cpu_kernels.BLAS_GEMM not in lowered(lo) and cpu_kernels.BLAS_GEMM not in lowered(hi - 1)


def test_blas_opt_out(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv(cpu_kernels.BLAS_OPT_OUT, "0")
    assert cpu_kernels.available() and not cpu_kernels.wanted_gemm(64, jnp.float32, jnp.float32)
    assert "JAXGEN_CPU_BLAS=0" in cpu_kernels._state["blas_why"]


@pytest.mark.parametrize("k", [1, 5, 64])
def test_top_k_values_are_lax_top_ks(k):
    """Ties, -inf and signed zeros included; leading dims and vmap."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32).round(1)  # rounding makes ties
    x[0, 0, :10] = -np.inf
    x[1, 2] = 0.0
    x[1, 2, ::3] = -0.0
    x = jnp.asarray(x)
    want = jax.lax.top_k(x, k)[0]
    np.testing.assert_array_equal(jax.jit(cpu_kernels.top_k_values, static_argnums=1)(x, k), want)
    np.testing.assert_array_equal(jax.vmap(lambda r: cpu_kernels.top_k_values(r, k))(x), want)


def test_sampling_filter_with_the_top_k_kernel_equals_xlas(monkeypatch):
    from jaxgen.sampling import filtering

    logits = jnp.asarray(np.random.default_rng(0).standard_normal((5, 300)).astype(np.float32).round(1))
    calls = []
    real = cpu_kernels.top_k_values
    monkeypatch.setattr(cpu_kernels, "top_k_values", lambda x, k: calls.append(k) or real(x, k))
    settings = [(20, 0.0), (20, 0.9), (0, 0.8), (300, 0.96)]
    got = [filtering.top_k_top_p_filter(logits, k, p) for k, p in settings]
    assert calls == [20, 20, 300, 300]
    monkeypatch.setattr(cpu_kernels, "wanted_top_k", lambda dtype: False)
    for (k, p), g in zip(settings, got):
        np.testing.assert_array_equal(g, filtering.top_k_top_p_filter(logits, k, p))


def _other_simd_width() -> str:
    """Compiler flags for a narrower SIMD width than this CPU's native build (the kernels' vector type and tiles follow
    the instruction set: 16 lanes with AVX-512, 8 with AVX2, 4 with SSE / NEON)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "-O2"  # no narrower x86 set to ask for: a second build of the native width
    return "-mno-avx512f" if "avx512f" in cpu_kernels._cpu_flags().split() else "-mno-avx"


def test_a_narrower_simd_build_gives_the_same_numbers(tmp_path):
    """The kernels built for another SIMD width than the one this CI machine has (a fresh cache, in a child process:
    one process registers one build) pass the float64 comparisons above."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAXGEN_CACHE_DIR=str(tmp_path), **{cpu_kernels.EXTRA_FLAGS: _other_simd_width()})
    tests = "float64 or decode_attention_is_the_masked or kernel_builds_here or group_norm_kernel or matmul_wt"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-k",
                           tests, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert list((tmp_path / "kernels").glob("cpu_*.so")), "the child did not build its own kernels"
    assert " passed" in done.stdout and "deselected" in done.stdout


@pytest.mark.parametrize("shape,groups", [((2, 9, 7, 96), 32), ((3, 300, 40), 8), ((1, 2, 2, 64), 32)])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_kernel_is_the_reference_with_its_gradient(shape, groups, silu):
    """Channel counts off the SIMD width (40), more pixels than one statistics block (300 > 256), a shifted mean."""
    from jaxgen.nn.conv import _group_norm_kernel, _group_norm_reference

    rng = np.random.default_rng(len(shape) + groups)
    x = jnp.asarray(rng.standard_normal(shape) * 3.0 + 20.0, jnp.float32)
    scale, bias = (jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32) for _ in range(2))
    x64 = np.asarray(x, np.float64).reshape(shape[0], -1, groups, shape[-1] // groups)
    centred = x64 - x64.mean(axis=(1, 3), keepdims=True)
    want = (centred / np.sqrt(centred.var(axis=(1, 3), keepdims=True) + 1e-6)).reshape(shape)
    want = want * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)
    if silu:
        want = want / (1.0 + np.exp(-want))
    got = jax.jit(lambda *a: _group_norm_kernel(*a, groups, 1e-6, silu))(x, scale, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(*a, groups, 1e-6, silu)))

    for g_kernel, g_ref in zip(jax.grad(loss(_group_norm_kernel), argnums=(0, 1, 2))(x, scale, bias),
                               jax.grad(loss(_group_norm_reference), argnums=(0, 1, 2))(x, scale, bias)):
        np.testing.assert_allclose(g_kernel, g_ref, rtol=1e-3, atol=1e-3)  # sums of up to 900 terms


def test_group_norm_takes_the_kernel_at_inference_only():
    from jaxgen.nn.conv import GroupNorm

    layer = GroupNorm(num_groups=4)
    x = jnp.ones((2, 4, 4, 8))
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x))

    def lowered(deterministic):
        return jax.jit(lambda p, x: layer.apply(p, x, silu=True, deterministic=deterministic)).lower(
            params, x).as_text()

    assert cpu_kernels.GROUP_NORM in lowered(True) and cpu_kernels.GROUP_NORM not in lowered(False)


@pytest.mark.parametrize("m,k,n", [(9, 64, 70), (16, 1024, 48), (13, 37, 6), (48, 100, 13)])
def test_matmul_wt_reads_out_major_kernels(m, k, n):
    """Row counts off the 4-row tiles, column counts off the column groups, K off the SIMD width; gradients too."""
    rng = np.random.default_rng(m + k + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    wt = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
    x64, wt64 = np.asarray(x, np.float64), np.asarray(wt, np.float64)
    assert cpu_kernels.wanted_wt(m, jnp.float32, jnp.float32)
    np.testing.assert_allclose(jax.jit(cpu_kernels.matmul_wt)(x, wt), x64 @ wt64.T, rtol=1e-5,
                               atol=1e-4 * np.sqrt(k))
    g = rng.standard_normal((m, n))
    gx, gwt = jax.grad(lambda x, wt: jnp.sum(cpu_kernels.matmul_wt(x, wt) * g), argnums=(0, 1))(x, wt)
    np.testing.assert_allclose(gx, g @ wt64, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gwt, g.T @ x64, rtol=1e-4, atol=1e-3)


def _conv3_float64(x, kernel, bias, upsample):
    x = np.asarray(x, np.float64)
    if upsample:
        x = x.repeat(2, axis=1).repeat(2, axis=2)
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    k = np.asarray(kernel, np.float64)
    out = sum(xp[:, i:i + h, j:j + w] @ k[i, j] for i in range(3) for j in range(3))
    return out + np.asarray(bias, np.float64)


# (batch, H, W, C, O): channel counts off the SIMD width and O off the register tiles (BLAS + scalar tails), O a
# multiple of the tiles (32 columns with AVX-512, 16 with AVX2), non-square images, more tiles than one block holds
@pytest.mark.parametrize("shape", [(1, 4, 8, 5, 7), (2, 12, 8, 17, 3), (2, 8, 16, 40, 64), (1, 40, 36, 16, 32)])
@pytest.mark.parametrize("upsample", [False, True])
def test_winograd_conv3_matches_float64_and_xlas_gradients(shape, upsample):
    b, h, w, c, o = shape
    kx, kk, kb, kg = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(kx, (b, h // 2 if upsample else h, w // 2 if upsample else w, c))
    kernel = jax.random.normal(kk, (3, 3, c, o)) / np.sqrt(9 * c)
    bias = jax.random.normal(kb, (o,))
    y = jax.jit(cpu_kernels.winograd_conv3, static_argnums=3)(x, kernel, bias, upsample)
    want = _conv3_float64(x, kernel, bias, upsample)
    assert y.shape == (b, h, w, o)
    # F(4x4, 3x3) in float32 sums more terms of larger magnitude than the direct conv: ~1e-5 of the output's scale
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-4 * np.abs(want).max(), rtol=0)

    g = jax.random.normal(kg, y.shape)
    grads = jax.grad(lambda x, k, bb: jnp.sum(cpu_kernels.winograd_conv3(x, k, bb, upsample) * g), (0, 1, 2))(
        x, kernel, bias)
    want_grads = jax.grad(lambda x, k, bb: jnp.sum((cpu_kernels._conv3_reference(x, k, upsample) + bb) * g),
                          (0, 1, 2))(x, kernel, bias)
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_conv_takes_winograd_for_3x3_convs_of_large_images_only(monkeypatch):
    from jaxgen.nn.conv import Conv

    def lowered(x, **kw):
        layer = Conv(8, **kw)
        params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x))
        return layer, params, jax.jit(layer.apply).lower(params, x).as_text()

    big = jnp.ones((1, 32, 32, 32))
    small = jnp.ones((1, 8, 8, 32))
    thin = jnp.ones((1, 32, 32, 8))
    assert cpu_kernels.WINOGRAD_MIN_PIXELS <= 32 * 32
    assert cpu_kernels.WINOGRAD_CONV3 in lowered(big, kernel_size=3, padding=1)[2]
    assert cpu_kernels.WINOGRAD_CONV3 in lowered(jnp.ones((1, 16, 16, 32)), kernel_size=3, padding=1,
                                                 upsample_nearest2=True)[2]  # a 32 x 32 conv
    assert cpu_kernels.WINOGRAD_MIN_IN_CHANNELS > 8
    assert cpu_kernels.WINOGRAD_CONV3 not in lowered(thin, kernel_size=3, padding=1)[2]
    for kw in (dict(kernel_size=3, padding=1, strides=2), dict(kernel_size=1), dict(kernel_size=3, padding=0),
               dict(kernel_size=3, padding=1, precision="highest")):
        assert cpu_kernels.WINOGRAD_CONV3 not in lowered(big, **kw)[2], kw
    assert cpu_kernels.WINOGRAD_CONV3 not in lowered(small, kernel_size=3, padding=1)[2]
    # the same numbers as XLA's conv (opted out), upsampling included
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 32))
    for kw in (dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=1, upsample_nearest2=True)):
        layer, params, _ = lowered(x, **kw)
        fast = layer.apply(params, x)
        monkeypatch.setenv(cpu_kernels.WINOGRAD_OPT_OUT, "0")
        assert cpu_kernels.WINOGRAD_CONV3 not in lowered(x, **kw)[2]
        np.testing.assert_allclose(np.asarray(fast), np.asarray(layer.apply(params, x)), rtol=1e-4, atol=1e-4)
        monkeypatch.delenv(cpu_kernels.WINOGRAD_OPT_OUT)
