"""MSVQFamily (VAR's multi-scale VQ tokenizer as a trainable family): loss, code-usage metrics, dead-code policy.

Tiny shapes: 6x6x1 images, stride 2, scales (1, 2, 3), a 16-code book. One jitted value_and_grad is shared by every
test in this module.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.common import base_config
from jaxgen.families.msvq import MSVQFamily
from jaxgen.nn.quantizer import dead_code_loss

VOCAB = 16


def tiny_msvq_config():
    c = base_config()
    c.family = "msvq"
    m = c.model
    m.vocab_size, m.z_channels, m.ch, m.ch_mult, m.num_res_blocks, m.num_groups = VOCAB, 4, 8, (1, 2), 1, 4
    m.in_channels, m.using_sa, m.using_mid_sa = 1, False, False
    m.v_patch_nums = (1, 2, 3)
    m.beta, m.quant_resi, m.share_quant_resi = 0.25, 0.5, 4
    c.data.image_size, c.data.channels = 6, 1
    return c


@pytest.fixture(scope="module")
def family():
    return MSVQFamily(tiny_msvq_config())


@pytest.fixture(scope="module")
def params(family):
    return nn.meta.unbox(jax.jit(family.init)(jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def forward(family):
    """Inference forward (indices, counts, quantiser inputs), compiled once for the module."""
    return jax.jit(lambda p, images: family.model.apply({"params": p}, images, train=False))


@pytest.fixture(scope="module")
def batch():
    images = jax.random.uniform(jax.random.PRNGKey(1), (8, 6, 6, 1), minval=-1.0, maxval=1.0)
    return {"image": images, "label": jnp.arange(8, dtype=jnp.int32) % 10}


@pytest.fixture(scope="module")
def loss_and_grad(family):
    return jax.jit(jax.value_and_grad(lambda p, b, r: family.loss(p, b, r, {}), has_aux=True))


def test_loss_metrics_and_grads(family, params, batch, loss_and_grad):
    (loss, metrics), grads = loss_and_grad(params, batch, jax.random.PRNGKey(2))
    assert np.isfinite(float(loss))
    for key in ("recon_mse", "vq_loss", "dead_code", "code_usage", "dead_fraction", "usage_last_scale", "perplexity"):
        assert key in metrics and np.isfinite(float(metrics[key])), key
    assert 0.0 < float(metrics["code_usage"]) <= 1.0
    assert float(metrics["code_usage"]) + float(metrics["dead_fraction"]) == pytest.approx(1.0)
    assert 1.0 <= float(metrics["perplexity"]) <= VOCAB + 1e-3
    # every part trains: encoder, decoder, quant convs, phi convs and the codebook
    for name in ("encoder", "decoder", "quant_conv", "post_quant_conv", "codebook", "qresi_0", "qresi_2"):
        g = jax.tree_util.tree_leaves(grads[name])
        assert any(float(jnp.max(jnp.abs(x))) > 0 for x in g), f"no gradient reaches {name}"


def test_code_usage_matches_the_indices(params, batch, forward):
    out = forward(params, batch["image"])
    used = np.unique(np.concatenate([np.asarray(i).ravel() for i in out["idx"]]))
    counts = np.asarray(out["counts"]).sum(0)
    assert set(np.flatnonzero(counts)) == set(used.tolist())
    assert counts.sum() == 8 * (1 + 4 + 9)


def test_dead_code_pull_only_moves_dead_codes():
    codebook = jnp.arange(12.0).reshape(4, 3)
    counts = jnp.array([3.0, 0.0, 1.0, 0.0])
    candidates = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    g = jax.jit(jax.grad(dead_code_loss))(codebook, counts, candidates, jax.random.PRNGKey(0))
    assert np.all(np.asarray(g[jnp.array([0, 2])]) == 0.0)  # live codes are untouched
    assert np.all(np.abs(np.asarray(g[jnp.array([1, 3])])) > 0.0)


def test_dead_codes_are_revived(params, batch, loss_and_grad, forward):
    """Half the codebook is moved far from every quantiser input (dead); a few optimizer steps on the codebook with the
    dead-code pull bring most of them back into use."""
    z = np.asarray(forward(params, batch["image"])["z"]).reshape(-1, 4)
    far = z.mean(0) + 6.0 * z.std() + 6.0
    dead = np.arange(VOCAB // 2, VOCAB)
    params = dict(params)
    params["codebook"] = params["codebook"].at[dead].set(jnp.asarray(far) + 0.1 * jnp.arange(len(dead))[:, None])

    def used(p):
        counts = forward(p, batch["image"])["counts"]
        return set(np.flatnonzero(np.asarray(counts).sum(0)).tolist())

    assert not used(params) & set(dead.tolist())
    steps = 60
    tx = optax.adam(optax.cosine_decay_schedule(0.3, steps, 0.01))  # large steps to travel, small ones to settle
    opt = tx.init(params["codebook"])
    for step in range(steps):
        _, grads = loss_and_grad(params, batch, jax.random.PRNGKey(100 + step))
        upd, opt = tx.update(grads["codebook"], opt)  # only the codebook moves: the pull alone must do it
        params["codebook"] = optax.apply_updates(params["codebook"], upd)
    revived = used(params) & set(dead.tolist())
    assert len(revived) >= len(dead) // 2, f"only {sorted(revived)} of the dead codes came back"
