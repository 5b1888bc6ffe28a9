"""Tiny MAR model checks (no fixtures): static-shape masking == official token dropping, remat / scan / gather
variants agree, label drop, init covers the diffusion head, patchify layout, attention paths."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.families.mar.model import MAR, dummy_inputs, init_params, max_visible, patchify, unpatchify
from jaxgen.nn.attention import dot_product_attention
from jaxgen.nn.layers import LayerNorm
from jaxgen.nn.transformer import BlockStack

TINY = dict(img_size=32, vae_stride=8, patch_size=1, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, mlp_ratio=2.0, vae_embed_dim=4,
            class_num=5, buffer_size=2, diffloss_d=1, diffloss_w=16)


def _params(model, seed=0):
    params = jax.tree_util.tree_map(jnp.asarray, jax.device_get(
        nn.meta.unbox(init_params(model, jax.random.PRNGKey(seed)))))
    # Official init leaves pos embeds tiny; make them O(1) so every term matters.
    k = jax.random.PRNGKey(seed + 1)
    for name in ("encoder_pos_embed_learned", "decoder_pos_embed_learned", "mask_token", "fake_latent"):
        k, sub = jax.random.split(k)
        params[name] = jax.random.normal(sub, params[name].shape)
    return params


def _inputs(model, b=3, n_masked=10, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((b, model.seq_len, model.token_dim)).astype(np.float32)
    mask = np.zeros((b, model.seq_len), np.float32)
    for i in range(b):
        mask[i, rng.permutation(model.seq_len)[:n_masked]] = 1
    labels = rng.integers(0, model.class_num, b)
    return jnp.asarray(tokens), jnp.asarray(labels), jnp.asarray(mask)


def _dropping_encoder(model, params, tokens, mask, class_emb):
    """The official forward_mae_encoder: drop masked tokens, run the blocks on the visible ones only."""
    p = params
    x = tokens @ p["z_proj"]["kernel"] + p["z_proj"]["bias"]
    b, _, d = x.shape
    x = jnp.concatenate([jnp.broadcast_to(class_emb[:, None], (b, model.buffer_size, d)), x], 1)
    x = LayerNorm(1e-6).apply({"params": p["z_proj_ln"]}, x + p["encoder_pos_embed_learned"])
    keep = np.concatenate([np.ones((b, model.buffer_size), bool), np.asarray(mask) == 0], 1)
    x = jnp.asarray(np.asarray(x)[keep].reshape(b, -1, d))
    stack = BlockStack(model.encoder_depth, model._block_kwargs(d, model.encoder_num_heads))
    x = stack.apply({"params": p["encoder_blocks"]}, x)
    return LayerNorm(model.norm_eps).apply({"params": p["encoder_norm"]}, x), keep


def test_static_encoder_equals_token_dropping():
    model = MAR(**TINY)
    params = _params(model)
    tokens, labels, mask = _inputs(model)
    ce = model.apply({"params": params}, labels, method=MAR.class_embedding)
    ref, keep = _dropping_encoder(model, params, tokens, mask, ce)
    ours = model.apply({"params": params}, tokens, mask, ce, method=MAR.forward_mae_encoder)
    assert ours.shape == (3, model.buffer_size + model.seq_len, 32)
    np.testing.assert_allclose(np.asarray(ours)[keep].reshape(ref.shape), ref, atol=2e-5, rtol=2e-5)
    # fixed-size gather: exact slot count, and with padding slots
    for k in (model.seq_len - 10, model.seq_len - 7):
        got = model.apply({"params": params}, tokens, mask, ce, num_keep=k, method=MAR.forward_mae_encoder)
        np.testing.assert_allclose(np.asarray(got)[keep].reshape(ref.shape), ref, atol=2e-5, rtol=2e-5)
    # the decoder never reads masked encoder rows: garbage there changes nothing
    garbage = jnp.where(jnp.asarray(keep)[..., None], ours, 1e3)
    z1 = model.apply({"params": params}, ours, mask, method=MAR.forward_mae_decoder)
    z2 = model.apply({"params": params}, garbage, mask, method=MAR.forward_mae_decoder)
    np.testing.assert_allclose(z1, z2, atol=1e-6)


def test_remat_and_scan_match_plain():
    model = MAR(**TINY)
    params = _params(model)
    tokens, labels, mask = _inputs(model)

    def loss(m, p):
        return jnp.sum(jnp.sin(m.apply({"params": p}, tokens, labels, mask)))

    ref_out = model.apply({"params": params}, tokens, labels, mask)
    ref_grad = jax.grad(lambda p: loss(model, p))(params)

    remat = MAR(**TINY, remat=True)
    np.testing.assert_allclose(remat.apply({"params": params}, tokens, labels, mask), ref_out, atol=1e-6)
    g = jax.grad(lambda p: loss(remat, p))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_grad)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

    def stacked(tree):
        blocks = [tree[f"block_{i}"] for i in range(len(tree))]
        return {"layers": {"block": jax.tree_util.tree_map(lambda *a: jnp.stack(a), *blocks)}}

    scan_params = dict(params, encoder_blocks=stacked(params["encoder_blocks"]),
                       decoder_blocks=stacked(params["decoder_blocks"]))
    for kw in (dict(scan_layers=True), dict(scan_layers=True, remat=True)):
        scan = MAR(**TINY, **kw)
        shapes = jax.tree_util.tree_map(jnp.shape, nn.meta.unbox(
            jax.eval_shape(lambda: init_params(scan, jax.random.PRNGKey(0)))))
        assert shapes == jax.tree_util.tree_map(jnp.shape, scan_params)
        np.testing.assert_allclose(scan.apply({"params": scan_params}, tokens, labels, mask), ref_out, atol=1e-5)


def test_decoder_on_chosen_positions_equals_the_full_decoder():
    """The sampler asks the decoder for the few tokens it reveals: the last block computes only those rows (plain
    stack) or they are gathered at the end (scan, remat); either way the same z as the full decoder's."""
    model = MAR(**TINY)
    params = _params(model)
    tokens, labels, mask = _inputs(model)
    enc = model.apply({"params": params}, tokens, mask, model.apply({"params": params}, labels,
                      method=MAR.class_embedding), method=MAR.forward_mae_encoder)
    full = model.apply({"params": params}, enc, mask, method=MAR.forward_mae_decoder)
    positions = jnp.asarray(np.random.default_rng(1).integers(0, model.seq_len, (3, 5)), jnp.int32)
    want = np.take_along_axis(np.asarray(full), np.asarray(positions)[..., None], axis=1)
    some = model.apply({"params": params}, enc, mask, False, positions, method=MAR.forward_mae_decoder)
    assert some.shape == (3, 5, model.decoder_embed_dim)
    np.testing.assert_allclose(some, want, atol=1e-5)
    stacked = {"layers": {"block": jax.tree_util.tree_map(
        lambda *a: jnp.stack(a), *[params["decoder_blocks"][f"block_{i}"] for i in range(model.decoder_depth)])}}
    for kw in (dict(scan_layers=True), dict(remat=True)):
        other = MAR(**TINY, **kw)
        p = dict(params, decoder_blocks=stacked) if kw.get("scan_layers") else params
        np.testing.assert_allclose(other.apply({"params": p}, enc, mask, False, positions,
                                               method=MAR.forward_mae_decoder), want, atol=1e-5)


def test_train_mode_label_drop_and_dropout():
    model = MAR(**dict(TINY, label_drop_prob=1.0, attn_dropout=0.0, proj_dropout=0.0))
    params = _params(model)
    tokens, labels, mask = _inputs(model)
    v = {"params": params}
    z_train = model.apply(v, tokens, labels, mask, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
    null = model.apply(v, tokens.shape[0], method=MAR.null_embedding)
    enc = model.apply(v, tokens, mask, null, method=MAR.forward_mae_encoder)
    z_null = model.apply(v, enc, mask, method=MAR.forward_mae_decoder)
    np.testing.assert_allclose(z_train, z_null, atol=1e-5)

    drop = MAR(**TINY)  # dropout 0.1 + label drop 0.1: stochastic, keyed by the 'dropout' rng
    a = drop.apply(v, tokens, labels, mask, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    b = drop.apply(v, tokens, labels, mask, train=True, rngs={"dropout": jax.random.PRNGKey(0)})
    c = drop.apply(v, tokens, labels, mask, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.all(np.isfinite(a))


def test_init_covers_whole_model():
    model = MAR(**TINY)
    params = nn.meta.unbox(init_params(model, jax.random.PRNGKey(0)))
    assert set(params) == {"class_emb", "fake_latent", "z_proj", "z_proj_ln", "encoder_pos_embed_learned",
                           "encoder_blocks", "encoder_norm", "decoder_embed", "mask_token",
                           "decoder_pos_embed_learned", "decoder_blocks", "decoder_norm",
                           "diffusion_pos_embed_learned", "diffloss"}
    assert params["encoder_pos_embed_learned"].shape == (1, model.buffer_size + model.seq_len, 32)
    # official init: biases 0, LayerNorm 1/0, free params normal(0.02)
    assert float(jnp.abs(params["encoder_blocks"]["block_0"]["attn"]["qkv"]["bias"]).max()) == 0.0
    assert 0.005 < float(jnp.std(params["decoder_pos_embed_learned"])) < 0.05
    eps = model.apply({"params": params}, jnp.zeros((4, model.token_dim)), jnp.arange(4), jnp.zeros((4, 32)),
                      method=MAR.denoise)
    assert eps.shape == (4, 2 * model.token_dim)


def test_patchify_matches_official_nchw_layout():
    model = MAR(**dict(TINY, patch_size=2, img_size=64))  # 8x8 latent, 4x4 tokens of dim 4*2*2
    rng = np.random.default_rng(0)
    nchw = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    # official: reshape(n, c, h', p, w', q) -> einsum nchpwq->nhwcpq -> (n, h'w', c p q)
    ref = nchw.reshape(2, 4, 4, 2, 4, 2).transpose(0, 2, 4, 1, 3, 5).reshape(2, 16, 16)
    tokens = patchify(jnp.asarray(nchw.transpose(0, 2, 3, 1)), model.patch_size)
    np.testing.assert_array_equal(tokens, ref)
    back = unpatchify(tokens, model.patch_size, model.vae_embed_dim)
    np.testing.assert_array_equal(np.asarray(back).transpose(0, 3, 1, 2), nchw)
    assert model.seq_len == 16 and model.token_dim == 16


def test_max_visible_bound():
    for seq_len in (16, 64, 256):
        worst = seq_len - int(np.ceil(seq_len * 0.7))
        assert max_visible(seq_len, 0.7) >= worst


def test_attention_paths_agree():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.random((2, 1, 1, 5)) > 0.4).at[:, :, :, 0].set(True)
    bias = jnp.asarray(rng.standard_normal((1, 3, 5, 5)), jnp.float32)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8) + bias
    probs = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), -1)
    ref = jnp.einsum("bnts,bsnh->btnh", probs, v)
    np.testing.assert_allclose(dot_product_attention(q, k, v, mask, bias, "xla"), ref, atol=1e-5)
    # dropout path at rate ~0 is the explicit path: same numbers
    np.testing.assert_allclose(dot_product_attention(q, k, v, mask, bias, dropout_rate=1e-9,
                                                     dropout_rng=jax.random.PRNGKey(0)), ref, atol=1e-5)
    # a fully masked row stays finite
    out = dot_product_attention(q, k, v, jnp.zeros((2, 1, 1, 5), bool), impl="auto")
    assert np.all(np.isfinite(out))
    # bf16 compute runs, softmax in f32
    out16 = dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), dot_product_attention(q, k, v, mask), atol=0.1)
    with pytest.raises(ValueError):
        dot_product_attention(q, k, v, impl="flash")


def test_bfloat16_forward_runs():
    model = MAR(**TINY, dtype=jnp.bfloat16)
    params = _params(model)
    tokens, labels, mask = _inputs(model)
    z = model.apply({"params": params}, tokens, labels, mask)
    assert z.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(z, np.float32)))
    ref = MAR(**TINY).apply({"params": params}, tokens, labels, mask)
    assert float(jnp.abs(z.astype(jnp.float32) - ref).max()) < 0.25 * float(jnp.abs(ref).max())


def test_from_config_reads_run_config():
    from configs import mar_l
    c = mar_l.get_config()
    c.remat = True
    from jaxgen import families
    m = families.build(c).model
    assert (m.encoder_embed_dim, m.encoder_depth, m.decoder_num_heads, m.diffloss_d, m.diffloss_w) == \
        (1024, 16, 16, 8, 1280)
    assert m.remat and m.dtype == jnp.bfloat16 and m.param_dtype == jnp.float32
    assert (m.seq_len, m.token_dim, m.buffer_size) == (256, 16, 64)
    tokens, labels, mask = dummy_inputs(MAR(**TINY), 2)
    assert tokens.shape == (2, 16, 4) and mask.shape == (2, 16)
