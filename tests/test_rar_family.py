"""RARFamily: the random-order annealing, the official weight-decay rule, the KV-cached CFG sampler against a
cache-free reference, and the official uint8 truncation (tiny shapes: 12x12 digits -> 3x3 codes, a 2-block RAR)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import maskgit_vqgan_tiny, rar_tiny
from jaxgen import families
from jaxgen.families.rar import sampler as sampler_mod
from jaxgen.families.rar.family import random_order_ratio
from jaxgen.sampling import guidance
from jaxgen.utils.images import to_uint8


def tiny_config(**sample):
    c = rar_tiny.get_config()
    c.model.hidden_size, c.model.depth, c.model.num_heads, c.model.mlp_dim = 32, 2, 2, 64
    c.data.image_size = 12
    c.loss.randomize_start, c.loss.randomize_end = 10, 20
    tok = maskgit_vqgan_tiny.get_config()
    tok.model.codebook_size, tok.model.resolution = 16, 12
    c.tokenizer.config = tok
    c.sample.update(sample)
    return c


@pytest.fixture(scope="module")
def family():
    return families.build(tiny_config())


@pytest.fixture(scope="module")
def params(family):
    p = nn.meta.unbox(jax.jit(family.init)(jax.random.PRNGKey(0)))

    @jax.jit  # one compile, not one eager kernel per leaf shape
    def perturb(p):
        # the adaLN-Zero init makes every block the identity: perturb so the logits depend on the input
        leaves, tree = jax.tree_util.tree_flatten(p)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        return jax.tree_util.tree_unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                                   for x, k in zip(leaves, keys)])

    return perturb(p)


def test_sizes_come_from_the_tokenizer(family):
    assert family.model.image_seq_len == 9 and family.model.codebook_size == 16
    assert family.batch_keys == ("indices", "label") and family.dummy_batch(3)["indices"].shape == (3, 9)


def test_random_order_ratio_anneals_from_one_to_zero():
    r = [float(random_order_ratio(s, 100, 200)) for s in (0, 99, 100, 150, 200, 500)]
    np.testing.assert_allclose(r, [1.0, 1.0, 1.0, 0.5, 0.0, 0.0])
    assert [float(random_order_ratio(s, 50, 50)) for s in (49, 50)] == [1.0, 0.0]


def test_loss_after_annealing_is_the_raster_loss(family, params):
    rng = np.random.default_rng(0)
    batch = {"indices": jnp.asarray(rng.integers(0, 16, (4, 9)), jnp.int32), "label": jnp.arange(4, dtype=jnp.int32)}
    loss_at = jax.jit(family.loss_at_step)
    late, m_late = loss_at(params, batch, jax.random.PRNGKey(2), {}, jnp.int32(25))
    early, m_early = loss_at(params, batch, jax.random.PRNGKey(2), {}, jnp.int32(0))
    assert float(m_late["random_ratio"]) == 0.0 and float(m_early["random_ratio"]) == 1.0
    # r = 0: every row in raster order; the same draw of the class dropout (same rng) as the model call below
    _, rng_drop = jax.random.split(jax.random.PRNGKey(2))
    logits = family.model.apply({"params": params}, batch["indices"], batch["label"], None, train=True,
                                rngs={"dropout": rng_drop})
    logp = jax.nn.log_softmax(logits, -1)
    raster = -jnp.mean(jnp.take_along_axis(logp, batch["indices"][..., None], -1))
    np.testing.assert_allclose(float(late), float(raster), rtol=1e-5)
    assert float(early) != pytest.approx(float(late))


def test_official_weight_decay_rule(family, params):
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(
        family.weight_decay_mask(params))[0]}
    assert flat["['cls_token']"] and flat["['lm_head']['kernel']"] and flat["['blocks_0']['attn']['qkv']['kernel']"]
    for name in ("['pos_embed']", "['target_aware_pos_embed']", "['timesteps_embeddings']",
                 "['embeddings']['embedding']", "['adaln_before_head']['adaLN_modulation']['kernel']",
                 "['blocks_0']['attn']['qkv']['bias']"):
        assert not flat[name], name


@pytest.mark.parametrize("slots_in_budget", [0.5, 1, 4, 9])  # per step (twice: no room, one slot); 3 x 3; all 9
def test_kv_cached_cfg_sampler_matches_a_cache_free_reference(family, params, monkeypatch, slots_in_budget):
    """Greedy draws: the fixed-size-cache loop gives the tokens of re-running the whole prefix every step, with the
    power-cosine guidance scale of each step, whether the adaLN modulations are computed per step or ahead for a
    chunk of slots (as many as fit the byte budget, a divisor of L); the step body is traced once."""
    traces = []
    per_slot = sampler_mod.modulation_bytes_per_slot(family.model, params, jnp.array([1, 7, 10], jnp.int32))
    model = family.model
    assert per_slot == 3 * model.depth * 6 * model.hidden_size * 4  # 3 distinct rows, f32
    budget = int(slots_in_budget * per_slot)

    def greedy(rng, logits, top_k=0, top_p=0.0, temperature=1.0, noise=None):
        traces.append(1)
        return logits, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    monkeypatch.setattr(sampler_mod, "sample_tokens", greedy)
    labels = jnp.array([1, 7], jnp.int32)
    g, pw = 3.0, 1.5
    cached = jax.jit(lambda p, l: sampler_mod.generate_tokens(family.model, p, l, jax.random.PRNGKey(0), g, pw,
                                                              modulation_bytes=budget))(params, labels)
    assert len(traces) == 1
    model, seq, null = family.model, family.model.image_seq_len, family.model.null_label
    labels2 = jnp.concatenate([labels, jnp.full_like(labels, null)])
    # causal: the logits at position t see tokens < t only, so one full-length forward (later slots zero) serves
    # every step, compiled once
    forward = jax.jit(lambda p, tok: model.apply({"params": p}, tok, labels2, method=type(model).forward_logits))
    tokens = np.zeros((2, seq), np.int32)
    for t in range(seq):
        both = forward(params, jnp.asarray(np.concatenate([tokens, tokens])))
        scale = guidance.power_cosine_scale(t, seq, g, pw)
        tokens[:, t] = np.asarray(jnp.argmax(guidance.mix_halves(both[:, t], scale), -1), np.int32)
    np.testing.assert_array_equal(np.asarray(cached), tokens)


def test_random_draws_are_the_same_with_modulations_and_noise_per_chunk_or_per_step(family, params):
    """Categorical draws (not greedy): chunks of slots (modulations and Gumbel noise computed ahead) give the tokens
    of computing both at every step from the step's key."""
    per_slot = sampler_mod.modulation_bytes_per_slot(family.model, params, jnp.array([1, 7, 10], jnp.int32))
    run = jax.jit(lambda p, l, budget: sampler_mod.generate_tokens(family.model, p, l, jax.random.PRNGKey(5), 3.0,
                                                                   1.5, 1.0, budget), static_argnums=2)
    labels = jnp.array([1, 7], jnp.int32)
    per_step = np.asarray(run(params, labels, per_slot // 2))
    np.testing.assert_array_equal(np.asarray(run(params, labels, 9 * per_slot)), per_step)
    assert len(np.unique(per_step)) > 2


def test_samples_are_in_range_and_truncated_like_the_official_uint8(family, params):
    frozen = {"tokenizer": nn.meta.unbox(jax.jit(family.tokenizer.init)(jax.random.PRNGKey(3)))}
    images = jax.jit(family.sample)(params, frozen, jnp.array([0, 5], jnp.int32), jax.random.PRNGKey(4))
    assert images.shape == (2, 12, 12, 1) and float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    x01 = np.random.default_rng(5).random((3, 4, 4, 1)).astype(np.float32)
    ours = to_uint8(np.asarray(sampler_mod.truncate_to_uint8_grid(jnp.asarray(x01))))
    np.testing.assert_array_equal(ours, (x01 * 255).astype(np.uint8))  # torch's .to(uint8) truncates
