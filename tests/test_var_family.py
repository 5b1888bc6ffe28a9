"""VARFamily: teacher-forcing loss, cond drop, the official weight-decay exclusions, the KV-cached sampler (compiled
once, images in range), top-k / top-p semantics and the lin0 schedule.

Tiny shapes: 6x6x1 images, a tokenizer with scales (1, 2, 3) (14 tokens) and a 16-code book, a 2-block VAR of width
32. The tokenizer params are random (frozen), as a VAR run receives them in frozen['tokenizer'].
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.common import base_config
from jaxgen.families.var.family import VARFamily, cross_entropy, var_weight_decay_mask
from jaxgen.sampling.filtering import sample_tokens, top_k_top_p_filter
from jaxgen.train.optim import make_schedule
from tests.test_msvq_family import tiny_msvq_config

NUM_CLASSES = 10


def tiny_var_config(loss=None, **model):
    c = base_config()
    c.family = "var"
    m = c.model
    m.depth, m.embed_dim, m.num_heads, m.mlp_ratio = 2, 32, 2, 2.0
    m.num_classes, m.drop_path_rate, m.cond_drop_rate = NUM_CLASSES, 0.1, 0.1
    m.init_adaln_gamma = 1e-3
    m.update(model)
    c.loss.update(loss or {})
    c.data.image_size, c.data.channels, c.data.num_classes = 6, 1, NUM_CLASSES
    c.tokenizer.config = tiny_msvq_config()
    c.sample.cfg, c.sample.top_k, c.sample.top_p, c.sample.more_smooth = 1.5, 8, 0.9, False
    return c


@pytest.fixture(scope="module")
def family():
    return VARFamily(tiny_var_config())


@pytest.fixture(scope="module")
def params(family):
    return nn.meta.unbox(jax.jit(family.init)(jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def frozen(family):
    return {"tokenizer": nn.meta.unbox(jax.jit(family.tokenizer.init)(jax.random.PRNGKey(1)))}


@pytest.fixture(scope="module")
def batch():
    images = jax.random.uniform(jax.random.PRNGKey(2), (4, 6, 6, 1), minval=-1.0, maxval=1.0)
    return {"image": images, "label": jnp.arange(4, dtype=jnp.int32)}


def test_loss_is_finite_and_every_param_gets_a_gradient(family, params, frozen, batch):
    assert family.model.seq_len == 14 and family.model.embed_dim == 32
    (loss, metrics), grads = jax.jit(jax.value_and_grad(family.loss, has_aux=True))(
        params, batch, jax.random.PRNGKey(3), frozen)
    assert np.isfinite(float(loss))
    assert set(metrics) >= {"loss", "acc", "loss_tail", "acc_tail"}
    # an untrained model predicts ~uniformly over the 16 codes
    assert abs(float(loss) - np.log(16)) < 0.5
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = [jax.tree_util.keystr(p) for p, g in flat if not float(jnp.max(jnp.abs(g))) > 0]
    assert not dead, f"no gradient reaches {dead}"


def test_teacher_forcing_targets_come_from_the_tokenizer(family, frozen, batch):
    idx_list, x_in = jax.jit(family.teacher_forcing_inputs)(batch, frozen)
    assert [i.shape for i in idx_list] == [(4, 1), (4, 4), (4, 9)]
    assert x_in.shape == (4, 14 - 1, 4)
    ref = jax.jit(family.tokenizer.encode)(frozen["tokenizer"], batch["image"])["indices"]
    np.testing.assert_array_equal(np.concatenate([np.asarray(a) for a in idx_list], 1), np.asarray(ref))


def test_cached_indices_give_the_same_loss(frozen, batch):
    """data.cache: batches carry the tokenizer's indices (--mode=cache), the loss is the same."""
    cached_cfg = tiny_var_config()
    cached_cfg.data.cache = True
    cached = VARFamily(cached_cfg)
    assert cached.batch_keys == ("indices", "label")
    assert cached.dummy_batch(4)["indices"].shape == (4, 14)
    image_family = VARFamily(tiny_var_config())
    params = nn.meta.unbox(jax.jit(image_family.init)(jax.random.PRNGKey(0)))
    indices = jax.jit(image_family.tokenizer.encode)(frozen["tokenizer"], batch["image"])["indices"]
    a, _ = jax.jit(image_family.loss)(params, batch, jax.random.PRNGKey(5), frozen)
    b, _ = jax.jit(cached.loss)(params, {"indices": indices, "label": batch["label"]}, jax.random.PRNGKey(5), frozen)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_cross_entropy_label_smoothing_matches_torch_definition():
    logits = jnp.array([[[2.0, 0.0, -1.0, 0.5]]])
    target = jnp.array([[0]])
    logp = np.asarray(jax.nn.log_softmax(logits[0, 0]))
    ls = 0.1
    want = -((1 - ls) * logp[0] + ls * logp.mean())
    assert float(cross_entropy(logits, target, ls)[0, 0]) == pytest.approx(want, rel=1e-6)
    assert float(cross_entropy(logits, target)[0, 0]) == pytest.approx(-logp[0], rel=1e-6)


def test_cond_drop_swaps_labels_for_the_null_class(family, params):
    """Training logits of a row equal the null-class logits exactly for the dropped rows (~cond_drop_rate of them)."""
    model = family.model
    b = 400
    labels = jnp.arange(b, dtype=jnp.int32) % NUM_CLASSES
    x = jax.random.normal(jax.random.PRNGKey(4), (b, model.seq_len - 1, model.cvae))
    nodrop = model.clone(drop_path_rate=0.0)  # isolate cond drop from drop path

    @jax.jit
    def run(p):
        train = nodrop.apply({"params": p}, labels, x, train=True, rngs={"dropout": jax.random.PRNGKey(5)})
        null = nodrop.apply({"params": p}, jnp.full_like(labels, NUM_CLASSES), x)
        cond = nodrop.apply({"params": p}, labels, x)
        return train, null, cond

    train, null, cond = run(params)
    is_null = np.all(np.isclose(train, null, atol=1e-5), axis=(1, 2))
    is_cond = np.all(np.isclose(train, cond, atol=1e-5), axis=(1, 2))
    assert np.all(is_null ^ is_cond)  # every row is exactly one of the two
    assert 0.05 < is_null.mean() < 0.16, is_null.mean()


def test_weight_decay_mask_follows_the_official_exclusions():
    fam = VARFamily(tiny_var_config(shared_aln=True))
    shapes = jax.eval_shape(fam.init, jax.random.PRNGKey(0))
    mask = var_weight_decay_mask(nn.meta.unbox(shapes))
    flat = {jax.tree_util.keystr(p, simple=True, separator="/"): m
            for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = {"word_embed/kernel", "class_emb/embedding", "shared_ada_lin/kernel", "head_nm/ada_lin/kernel",
               "head/kernel"} | {f"blocks_{i}/{name}/kernel" for i in range(2)
                                 for name in ("attn/qkv", "attn/proj", "ffn/fc1", "ffn/fc2")}
    assert {k for k, m in flat.items() if m} == decayed
    for k in ("pos_start", "pos_1LC", "lvl_embed/embedding", "blocks_0/ada_gss", "blocks_0/attn/scale_mul",
              "blocks_0/attn/q_bias", "blocks_0/attn/v_bias", "head/bias", "word_embed/bias"):
        assert flat[k] is False, k
    assert fam.weight_decay_mask(nn.meta.unbox(shapes)) == mask


def test_sampler_compiles_once_and_gives_images_in_range(family, params, frozen):
    traces = []

    def sample(p, fr, labels, rng):
        traces.append(1)
        return family.sample(p, fr, labels, rng)

    fn = jax.jit(sample)
    labels = jnp.array([0, 3, 7, NUM_CLASSES], jnp.int32)  # NUM_CLASSES: unconditional
    a = fn(params, frozen, labels, jax.random.PRNGKey(0))
    b = fn(params, frozen, labels[::-1], jax.random.PRNGKey(1))
    assert len(traces) == 1
    for img in (a, b):
        assert img.shape == (4, 6, 6, 1) and img.dtype == jnp.float32
        assert float(jnp.min(img)) >= -1.0 and float(jnp.max(img)) <= 1.0
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_top_k_keeps_the_k_largest_and_their_ties():
    logits = jnp.array([[1.0, 5.0, 3.0, 3.0, -2.0]])
    kept = np.isfinite(np.asarray(top_k_top_p_filter(logits, top_k=2)))
    np.testing.assert_array_equal(kept[0], [False, True, True, True, False])  # a tie with the k-th stays
    kept = np.isfinite(np.asarray(top_k_top_p_filter(logits, top_k=1)))
    np.testing.assert_array_equal(kept[0], [False, True, False, False, False])


def test_top_p_drops_the_low_tail_but_always_keeps_the_top_token():
    probs = jnp.array([0.05, 0.5, 0.15, 0.3])
    logits = jnp.log(probs)[None]
    # ascending cumulative probabilities 0.05, 0.2, 0.5, 1.0; top_p 0.7 drops those <= 0.3: the 0.05 and 0.15 tokens
    kept = np.isfinite(np.asarray(top_k_top_p_filter(logits, top_p=0.7)))
    np.testing.assert_array_equal(kept[0], [False, True, False, True])
    kept = np.isfinite(np.asarray(top_k_top_p_filter(logits, top_p=1e-6)))
    np.testing.assert_array_equal(kept[0], [False, True, False, False])
    _, idx = sample_tokens(jax.random.PRNGKey(0), jnp.log(probs)[None, None], top_k=1)
    assert int(idx[0, 0]) == 1


def _sorted_filter_reference(logits, top_k, top_p):
    """The official algorithm in float64 numpy: threshold at the k-th largest, then an ascending sort and cumsum."""
    out = logits.astype(np.float64).copy()
    if top_k:
        out[out < np.sort(out, axis=-1)[:, -top_k][:, None]] = -np.inf
    if top_p:
        for row in out:
            order = np.argsort(row, kind="stable")
            probs = np.exp(row[order] - row.max())
            remove = np.cumsum(probs / probs.sum()) <= 1 - top_p
            remove[-1] = False
            row[order[remove]] = -np.inf
    return np.isfinite(out)


@pytest.mark.parametrize("top_k,top_p", [(900, 0.96), (0, 0.9), (40, 0.5), (1, 0.96), (900, 0.0)])
def test_top_k_top_p_matches_the_sorted_algorithm(top_k, top_p):
    """The filter works from one top_k, not two sorts of the vocabulary; on logits without ties it keeps exactly
    the tokens of the official sort / cumsum algorithm (tie groups at the top-p cut are kept whole)."""
    rng = np.random.default_rng(top_k)
    logits = np.stack([rng.permutation(np.linspace(-s, s, 4096)) for s in (2.0, 5.0, 9.0, 14.0)]).astype(np.float32)
    kept = np.isfinite(np.asarray(top_k_top_p_filter(jnp.asarray(logits), top_k, top_p)))
    np.testing.assert_array_equal(kept, _sorted_filter_reference(logits, top_k, top_p))
    tied = jnp.array([[0.0, 1.0, 1.0, 1.0, 3.0]])  # ascending mass of the 1.0 group straddles 1 - top_p
    np.testing.assert_array_equal(np.isfinite(np.asarray(top_k_top_p_filter(tied, 0, 0.8))), [[0, 1, 1, 1, 1]])


def test_progressive_stage_trains_on_the_first_scales():
    fam = VARFamily(tiny_var_config(loss={"train_scales": 2}))
    shapes = {"image": jax.ShapeDtypeStruct((2, 6, 6, 1), jnp.float32),
              "label": jax.ShapeDtypeStruct((2,), jnp.int32)}
    params = jax.eval_shape(fam.init, jax.random.PRNGKey(0))
    frozen = {"tokenizer": jax.eval_shape(fam.tokenizer.init, jax.random.PRNGKey(0))}
    loss, metrics = jax.eval_shape(fam.loss, nn.meta.unbox(params), shapes, jax.random.PRNGKey(0),
                                   nn.meta.unbox(frozen))
    assert loss.shape == () and metrics["loss_tail"].shape == ()
    idx, x_in = jax.eval_shape(fam.teacher_forcing_inputs, shapes, nn.meta.unbox(frozen))
    assert [i.shape for i in idx] == [(2, 1), (2, 4)] and x_in.shape == (2, 4, 4)


def test_lin0_schedule_with_warmup_from_a_fraction_of_the_peak():
    o = ml_collections.ConfigDict(dict(lr=0.0, blr=1e-4, schedule="lin0", warmup_steps=100, warmup_init=0.005,
                                       end_factor=0.1))
    sched = make_schedule(o, total_steps=1100, batch_size=768)
    peak = 1e-4 * 768 / 256
    rel = 1e-5  # float32 schedule arithmetic
    assert float(sched(0)) == pytest.approx(0.005 * peak, rel=rel)
    assert float(sched(100)) == pytest.approx(peak, rel=rel)
    assert float(sched(100 + 49)) == pytest.approx(peak, rel=rel)  # held for 5% of the 1000 post-warmup steps
    assert float(sched(1100)) == pytest.approx(0.1 * peak, rel=rel)
    assert float(sched(600)) < peak


def test_block_causal_attention_by_scale_chunks_is_the_full_masked_attention():
    from jaxgen.families.var.model import attention_chunks, block_causal_mask
    from jaxgen.nn.attention import clip_query_chunks, dot_product_attention

    pn = (1, 2, 3, 4, 6)
    chunks = attention_chunks(pn, min_tokens=9)
    assert chunks == ((0, 5, False), (5, 14, True), (14, 30, True), (30, 66, True))
    assert attention_chunks((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) == (
        (0, 91, False), (91, 155, True), (155, 255, True), (255, 424, True), (424, 680, True))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 66, 2, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(block_causal_mask(pn))[None, None]
    bias = jnp.asarray(rng.standard_normal((1, 2, 66, 66)), jnp.float32)

    def attend(q, k, v, length, query_chunks):
        return dot_product_attention(q[:, :length], k[:, :length], v[:, :length], mask[..., :length, :length],
                                     bias[..., :length, :length], "xla", query_chunks=query_chunks)

    for length in (66, 40, 5):  # the whole sequence and prefixes (progressive training)
        cut = clip_query_chunks(chunks, length)
        np.testing.assert_allclose(attend(q, k, v, length, cut), attend(q, k, v, length, None), atol=2e-6)
        # the unmasked (one-scale) chunks without a bias take jaxgen's CPU kernel: the same attention
        no_bias = dot_product_attention(q[:, :length], k[:, :length], v[:, :length], mask[..., :length, :length],
                                        None, "xla", query_chunks=cut)
        dense = dot_product_attention(q[:, :length], k[:, :length], v[:, :length], mask[..., :length, :length])
        np.testing.assert_allclose(no_bias, dense, atol=2e-6)
    grads = [jax.grad(lambda *a: jnp.sum(jnp.sin(attend(*a, 66, c))), argnums=(0, 1, 2))(q, k, v)
             for c in (chunks, None)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=2e-6)
    with pytest.raises(ValueError, match="cover"):
        attend(q, k, v, 66, ((0, 5), (6, 66)))


def test_var_teacher_forcing_with_scale_chunks_matches_the_dense_mask(family, params, frozen, batch):
    """config.model.attn_chunk_tokens: per chunk of scales (here (0, 1), (1, 5), (5, 14), each one scale, so with no
    mask: jaxgen's CPU attention kernel) = one dense masked pass."""
    from jaxgen.families.var.model import attention_chunks

    _, x_in = family.teacher_forcing_inputs(batch, frozen)
    assert attention_chunks(family.model.patch_nums, 4) == ((0, 1, True), (1, 5, True), (5, 14, True))
    out = {n: family.model.clone(attn_chunk_tokens=n).apply({"params": params}, batch["label"], x_in) for n in (4, 0)}
    np.testing.assert_allclose(out[4], out[0], atol=1e-5)


def test_l2_normalize_is_torchs_with_its_gradient_from_the_output():
    """F.normalize(x) = x / max(||x||, 1e-12); the gradient, written from the output and the norm (so training keeps
    no raw q / k), is autodiff's away from zero and the clamped linear map's at zero (where autodiff gives NaN)."""
    from jaxgen.families.var.model import _l2_normalize

    def reference(x):
        return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)), 1e-12)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32).at[0, 0].set(0.0).at[0, 1].set(1e-14)
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    np.testing.assert_allclose(_l2_normalize(x), reference(x), rtol=1e-6, atol=1e-7)
    got = jax.vjp(_l2_normalize, x)[1](g)[0]
    want = jax.vjp(reference, x)[1](g)[0]
    np.testing.assert_allclose(got[1:], want[1:], rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got[0, 1], want[0, 1], rtol=1e-6)  # clamped: x / eps
    np.testing.assert_allclose(got[0, 0], g[0, 0] / 1e-12, rtol=1e-6)  # at zero: the same linear map, not NaN
