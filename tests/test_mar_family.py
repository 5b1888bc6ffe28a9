"""MARFamily: training loss, masking, weight decay and the static-shape sampler (tiny configs, CPU)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import kl_vae_tiny
from configs.common import base_config
from jaxgen.families.mar import family as fam_mod
from jaxgen.families.mar import sampler as sampler_mod
from jaxgen.families.mar.family import MARFamily, training_mask
from jaxgen.sampling.guidance import mar_scales as cfg_scales
from jaxgen.sampling.schedules import mar_mask_schedule


def tiny_config(cache=True):
    c = base_config()
    c.family = "mar"
    m = c.model
    m.img_size, m.vae_stride, m.patch_size, m.vae_embed_dim = 16, 4, 1, 4  # 4x4 = 16 tokens of dim 4
    m.encoder_embed_dim = m.decoder_embed_dim = 32
    m.encoder_depth = m.decoder_depth = 1
    m.encoder_num_heads = m.decoder_num_heads = 2
    m.mlp_ratio, m.class_num, m.buffer_size = 2.0, 10, 2
    m.diffloss_d, m.diffloss_w, m.diffusion_batch_mul = 1, 32, 2
    c.data.cache = cache
    c.data.image_size, c.data.channels = 16, 1
    tok = kl_vae_tiny.get_config()  # stride 4, 4 latent channels: 16x16 digits -> 4x4x4 latents
    tok.data.image_size, tok.model.resolution = 16, 16
    c.tokenizer.config = tok
    c.sample.num_iter, c.sample.cfg, c.sample.cfg_schedule = 4, 2.0, "linear"
    c.sample.temperature, c.sample.num_sampling_steps = 1.0, "4"
    return c


@pytest.fixture(scope="module")
def family():
    return MARFamily(tiny_config())


@pytest.fixture(scope="module")
def params(family):
    return nn.meta.unbox(jax.jit(family.init)(jax.random.PRNGKey(0)))  # jitted: one compile, not one per op


@jax.jit  # one compile instead of one eager kernel per leaf shape
def _perturbed(params):
    # The official init zeroes the head's adaLN / output layers, which blocks all gradient into the transformer
    # at step 0; small noise on every leaf makes every parameter's gradient observable.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [p + 0.02 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def _batch(family, b=3):
    shapes = family.dummy_batch(b)
    rng = jax.random.PRNGKey(2)
    return {"moments": jax.random.normal(rng, shapes["moments"].shape),
            "label": jnp.arange(b, dtype=jnp.int32) % 10}


def test_dummy_batch_and_keys(family):
    shapes = family.dummy_batch(5)
    assert family.batch_keys == ("moments", "label")
    assert shapes["moments"].shape == (5, 4, 4, 8) and shapes["label"].shape == (5,)
    img = MARFamily(tiny_config(cache=False))
    assert img.batch_keys == ("image", "label")
    assert img.dummy_batch(2)["image"].shape == (2, 16, 16, 1)


def test_loss_finite_and_grads_reach_transformer_and_head(family, params):
    p = _perturbed(params)
    batch = _batch(family)
    loss_and_grad = jax.jit(jax.value_and_grad(lambda q, rng: family.loss(q, batch, rng, {}), has_aux=True))
    (loss, metrics), grads = loss_and_grad(p, jax.random.PRNGKey(3))
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert 0.7 <= float(metrics["mask_ratio"]) <= 1.0
    norms = {jax.tree_util.keystr(k): float(np.linalg.norm(np.asarray(g))) for k, g in
             jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert all(np.isfinite(v) for v in norms.values())
    for frag in ("z_proj", "encoder_blocks", "decoder_blocks", "decoder_pos_embed_learned", "mask_token",
                 "diffusion_pos_embed_learned", "class_emb", "diffloss"):
        assert max(v for k, v in norms.items() if frag in k) > 0, frag
    # Same rng -> same loss (deterministic given rng); different rng -> different draw.
    # (the same compiled program again: eager op-by-op calls would compile every op, ~20 s on a cold cache)
    (l2, _), _ = loss_and_grad(p, jax.random.PRNGKey(3))
    (l3, _), _ = loss_and_grad(p, jax.random.PRNGKey(4))
    np.testing.assert_allclose(float(l2), float(loss), rtol=1e-5)
    assert float(l3) != float(loss)


@pytest.mark.parametrize("seq_len", [16, 256])
def test_mask_count_is_ceil_of_ratio(seq_len):
    masks, ratios = jax.jit(jax.vmap(lambda k: training_mask(k, 4, seq_len)))(
        jax.random.split(jax.random.PRNGKey(5), 64))
    masks, ratios = np.asarray(masks), np.asarray(ratios)
    assert len(np.unique(ratios)) > 50  # several different ratios
    for m, r in zip(masks, ratios):
        counts = m.sum(axis=1)
        assert (counts == math.ceil(seq_len * float(r))).all(), (counts, r)
    # Orders differ per row: the masked sets are not all equal.
    assert any(not (m == m[0]).all() for m in masks)


def test_mask_ratio_distribution():
    r = np.asarray(jax.jit(jax.vmap(fam_mod.sample_mask_ratio))(jax.random.split(jax.random.PRNGKey(6), 20000)))
    assert r.min() >= 0.7 and r.max() <= 1.0
    # TruncNormal(mean 1, std .25) on [0.7, 1]: mean = 1 + .25 * (phi(-1.2) - phi(0)) / (Phi(0) - Phi(-1.2)).
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    expected = 1 + 0.25 * (phi(-1.2) - phi(0.0)) / (Phi(0.0) - Phi(-1.2))
    assert abs(r.mean() - expected) < 0.003, (r.mean(), expected)


def test_mask_ratio_min_is_read_from_the_config(params):
    """config.model.mask_ratio_min drives the mask-ratio draw, the masked counts and the encoder's visible slots."""
    low = tiny_config()
    low.model.mask_ratio_min = 0.3
    fam_low, fam_default = MARFamily(low), MARFamily(tiny_config())
    assert fam_low.num_keep > fam_default.num_keep
    batch = _batch(fam_default)
    keys = jax.random.split(jax.random.PRNGKey(7), 12)

    def ratios(fam):  # one compile per family, all keys at once
        return np.asarray(jax.jit(jax.vmap(lambda k: fam.loss(params, batch, k, {})[1]["mask_ratio"]))(keys)).tolist()

    ratios_low, ratios_default = ratios(fam_low), ratios(fam_default)
    assert min(ratios_default) >= 0.7 and min(ratios_low) < 0.7 and max(ratios_low) <= 1.0
    assert ratios_low != ratios_default


def test_weight_decay_mask(family, params):
    mask = family.weight_decay_mask(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    for key, decay in flat.items():
        if "diffloss" in key or key.endswith("['bias']") or key.endswith("['scale']"):
            assert not decay, key
    for name in ("fake_latent", "mask_token", "encoder_pos_embed_learned", "decoder_pos_embed_learned",
                 "diffusion_pos_embed_learned"):
        assert flat[f"['{name}']"], name
    assert flat["['class_emb']['embedding']"]
    assert flat["['z_proj']['kernel']"]
    assert any(v for k, v in flat.items() if "encoder_blocks" in k and k.endswith("['kernel']"))
    assert any("diffloss" in k and k.endswith("['kernel']") for k in flat)  # head kernels exist and are excluded


def test_sample_tokens_compiles_once_and_is_finite(family, params, monkeypatch):
    traces = {"fn": 0, "head": 0}
    real = sampler_mod.diffloss_sample

    def counting_sample(*a, **k):
        traces["head"] += 1
        return real(*a, **k)

    monkeypatch.setattr(sampler_mod, "diffloss_sample", counting_sample)

    def run(p, labels, rng):
        traces["fn"] += 1
        return family.sample_tokens(p, labels, rng, num_iter=4, cfg=2.0, cfg_schedule="linear", temperature=1.0,
                                    num_sampling_steps="4")

    fn = jax.jit(run)
    p = _perturbed(params)
    a = fn(p, jnp.array([1, 2], jnp.int32), jax.random.PRNGKey(7))
    b = fn(p, jnp.array([3, 4], jnp.int32), jax.random.PRNGKey(8))
    # One trace; the step body (one fori_loop) traced once, with one diffusion branch per revealed-count bucket.
    plan = sampler_mod.sampling_plan(family.model, 4)
    assert traces == {"fn": 1, "head": len(plan["diffusion_sizes"])}
    assert a.shape == b.shape == (2, 4, 4, 4)
    assert np.isfinite(np.asarray(a)).all() and np.isfinite(np.asarray(b)).all()
    assert not np.allclose(np.asarray(a), np.asarray(b))
    # Without CFG too.
    c = jax.jit(lambda p, l, r: family.sample_tokens(p, l, r, num_iter=3, cfg=1.0, num_sampling_steps="4"))(
        p, jnp.array([5, 6, 7], jnp.int32), jax.random.PRNGKey(9))
    assert c.shape == (3, 4, 4, 4) and np.isfinite(np.asarray(c)).all()


def _marking_sampler(value_fn):
    """Stand-in for diffloss_sample: every row sampled in a step gets one value, so a position's final token tells
    which step wrote it."""

    def fake(net, z, rng, diffusion, temperature=1.0, cfg=1.0, guided=None, channels=None, **_):
        return jnp.broadcast_to(jnp.asarray(value_fn(rng, cfg), jnp.float32), (z.shape[0], channels))

    return fake


def test_cfg_linear_schedule_per_step(family, params, monkeypatch):
    seq_len, num_iter, cfg = 16, 4, 3.0
    mask_len, num_pred = mar_mask_schedule(seq_len, num_iter)
    np.testing.assert_array_equal(mask_len, [14, 11, 6, 1])  # the parity fixture's schedule1
    np.testing.assert_array_equal(num_pred, [2, 3, 5, 6])
    expected = [1 + (cfg - 1) * (seq_len - m) / seq_len for m in mask_len]
    np.testing.assert_allclose(cfg_scales(mask_len, seq_len, cfg, "linear"), expected, rtol=1e-6)
    np.testing.assert_allclose(cfg_scales(mask_len, seq_len, cfg, "constant"), [cfg] * num_iter)

    # In the sampler: the tokens written at step k carry step k's cfg scale, and there are num_pred[k] of them.
    monkeypatch.setattr(sampler_mod, "diffloss_sample", _marking_sampler(lambda rng, c: c))
    out = jax.jit(lambda p, l, r: family.sample_tokens(p, l, r, num_iter=num_iter, cfg=cfg, cfg_schedule="linear",
                                                       num_sampling_steps="4"))(
        params, jnp.array([0, 1, 2], jnp.int32), jax.random.PRNGKey(10))
    tokens = np.asarray(out).reshape(3, seq_len, -1)
    for row in tokens:
        assert (row == row[:, :1]).all()
        values, counts = np.unique(row[:, 0], return_counts=True)
        np.testing.assert_allclose(values, sorted(expected), rtol=1e-6)
        np.testing.assert_array_equal(counts, [num_pred[expected.index(v)] for v in sorted(expected)])
    # Different samples use different orders.
    assert not (tokens[0] == tokens[1]).all()


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_one_token_per_step_when_num_iter_equals_seq_len(family, params, monkeypatch, cfg):
    seq_len = family.seq_len
    _, num_pred = mar_mask_schedule(seq_len, seq_len)
    assert (num_pred == 1).all()
    # Each step's rng is distinct, so distinct values <=> distinct steps wrote them.
    monkeypatch.setattr(sampler_mod, "diffloss_sample",
                        _marking_sampler(lambda rng, c: 1.0 + jax.random.uniform(rng, ())))
    out = jax.jit(lambda p, l, r: family.sample_tokens(p, l, r, num_iter=seq_len, cfg=cfg, num_sampling_steps="4"))(
        params, jnp.array([3, 4], jnp.int32), jax.random.PRNGKey(11))
    tokens = np.asarray(out).reshape(2, seq_len, -1)[..., 0]
    for row in tokens:
        assert (row >= 1.0).all()  # every position written
        assert len(np.unique(row)) == seq_len  # by seq_len different steps: one token per step


def _echo_sampler():
    """Stand-in for diffloss_sample that returns (a function of) its conditions: the final tokens then depend on
    every encoder / decoder output the sampler used, so two samplers agree only if those agree."""

    def fake(net, z, rng, diffusion, temperature=1.0, cfg=1.0, guided=None, channels=None, **_):
        return jnp.tanh(z[:, :channels]) * cfg

    return fake


def test_encoder_buckets_give_the_full_length_result(family, params, monkeypatch):
    """The encoder runs on buffer + a bucket of the order's last tokens; any bucketing (and the full sequence, as
    without buckets) gives the same tokens: masked rows are no keys and every visible token is in the bucket."""
    monkeypatch.setattr(sampler_mod, "diffloss_sample", _echo_sampler())
    p = _perturbed(params)
    labels, rng = jnp.array([1, 7], jnp.int32), jax.random.PRNGKey(12)

    def run(**kw):
        return np.asarray(jax.jit(lambda p_: family.sample_tokens(p_, labels, rng, num_iter=6, cfg=2.0,
                                                                  num_sampling_steps="4", **kw))(p))

    exact = run(encoder_buckets=16)
    assert np.abs(exact).max() > 0.05
    for buckets in (1, 2, 3):
        np.testing.assert_allclose(run(encoder_buckets=buckets), exact, atol=2e-5)
    real = sampler_mod.size_buckets
    calls = []

    def full_encoder(counts, max_buckets, cost=None):  # first call: the encoder -> one full-length bucket
        calls.append(1)
        if len(calls) == 1:
            return (family.seq_len,), np.zeros(len(counts), np.int32)
        return real(counts, max_buckets, cost)

    monkeypatch.setattr(sampler_mod, "size_buckets", full_encoder)
    np.testing.assert_allclose(run(encoder_buckets=16), exact, atol=2e-5)


def test_diffusion_buckets_keep_the_revealed_count(family, params, monkeypatch):
    """Any diffusion bucketing writes exactly num_pred[k] tokens at step k (the padded rows are dropped)."""
    seq_len, num_iter = 16, 4
    _, num_pred = mar_mask_schedule(seq_len, num_iter)
    monkeypatch.setattr(sampler_mod, "diffloss_sample", _marking_sampler(lambda rng, c: c))
    for buckets in (1, 2, 16):
        out = jax.jit(lambda p, l, r: family.sample_tokens(p, l, r, num_iter=num_iter, cfg=3.0, num_sampling_steps="4",
                                                           diffusion_buckets=buckets))(
            params, jnp.array([0, 1], jnp.int32), jax.random.PRNGKey(13))
        row = np.asarray(out).reshape(2, seq_len, -1)[0, :, 0]
        _, counts = np.unique(row, return_counts=True)
        np.testing.assert_array_equal(counts, num_pred)  # cfg scales grow with k, so sorted values = step order


@pytest.mark.parametrize("num_iter", [64, 256])
def test_paper_settings_run_the_official_work(num_iter):
    """MAR-B at the papers' step counts: the diffusion head samples exactly the 256 tokens of an image (the
    official count), and the encoder runs on at most 9 % more tokens than the official buffer + visible with the
    default 8 sizes (5 % with 16, 12 % with 6)."""
    from jaxgen.families.mar.model import MAR

    model = MAR(encoder_embed_dim=768, buffer_size=64)
    plan = sampler_mod.sampling_plan(model, num_iter)
    assert plan["diffusion_rows"] == plan["diffusion_rows_official"] == 256
    assert plan["encoder_tokens_official"] <= plan["encoder_tokens"] <= 1.09 * plan["encoder_tokens_official"]
    assert len(plan["encoder_sizes"]) == 8
    many = sampler_mod.sampling_plan(model, num_iter, encoder_buckets=16)
    assert len(many["encoder_sizes"]) == 16
    assert plan["encoder_tokens_official"] <= many["encoder_tokens"] <= 1.05 * plan["encoder_tokens_official"]
    few = sampler_mod.sampling_plan(model, num_iter, encoder_buckets=6)
    assert len(few["encoder_sizes"]) == 6
    assert plan["encoder_tokens"] < few["encoder_tokens"] <= 1.12 * plan["encoder_tokens_official"]


def test_out_major_head_kernels_sample_the_same(family, params, monkeypatch):
    """Diffusion branches at kernel_layout.MIN_ROWS rows or more read out-major copies of the head's step kernels:
    the same samples as with the (in, out) kernels, up to float32 summation order."""
    from jaxgen.nn import kernel_layout
    p = _perturbed(params)

    def sample(min_rows):
        monkeypatch.setattr(kernel_layout, "MIN_ROWS", min_rows)
        return np.asarray(jax.jit(lambda p, l, r: family.sample_tokens(p, l, r, num_iter=4, cfg=2.0,
                                                                       num_sampling_steps="4"))(
            p, jnp.array([1, 2], jnp.int32), jax.random.PRNGKey(7)))

    np.testing.assert_allclose(sample(1), sample(10 ** 9), rtol=1e-4, atol=1e-5)
