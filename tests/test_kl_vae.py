"""KL-VAE tokenizer, its conv building blocks, converter checks and the training family (tiny, CPU)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.kl_vae_tiny import get_config
from jaxgen.convert.kl_vae import _torch_name, convert_kl_vae, kl_vae_module
from jaxgen.errors import ConfigError
from jaxgen.families import build
from jaxgen.nn.conv import AttnBlock, Conv, Downsample, GroupNorm, ResnetBlock, Upsample
from jaxgen.tokenizers.kl_vae import DiagonalGaussian


@pytest.fixture(scope="module")
def family():
    return build(get_config())


@pytest.fixture(scope="module")
def params(family):
    return nn.meta.unbox(jax.jit(family.init)(jax.random.key(0)))  # jitted: one compile, not one per op


def _images(n=2, size=32, c=1, seed=0):
    return jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, (n, size, size, c)), jnp.float32)


# --- family -------------------------------------------------------------------------------------------------------
def test_tiny_encode_decode_shapes(family, params):
    cfg = get_config()
    stride = 2 ** (len(cfg.model.ch_mult) - 1)
    h = cfg.data.image_size // stride
    x = _images()
    moments = family.encode(params, x)["moments"]
    assert moments.shape == (2, h, h, 2 * cfg.model.embed_dim) and moments.dtype == jnp.float32
    assert family.cache_keys == ("moments",)
    assert family.code_shapes()["moments"].shape == moments.shape[1:]
    z = DiagonalGaussian(moments).sample(jax.random.key(1))
    y = family.decode(params, {"latent": z})
    assert y.shape == x.shape and y.dtype == jnp.float32 and float(jnp.max(jnp.abs(y))) <= 1.0
    r = family.reconstruct(params, x)  # the posterior mean, decoded
    np.testing.assert_allclose(r, family.decode(params, {"latent": DiagonalGaussian(moments).mode()}), atol=1e-6)
    with pytest.raises(ConfigError, match="decodes"):
        family.decode(params, {"indices": z})
    batch = family.dummy_batch(4)
    assert batch["image"].shape == (4, 32, 32, 1) and batch["label"].shape == (4,)
    assert not family.can_sample
    with pytest.raises(ConfigError, match="no class-conditional sampler"):
        family.sample(params, None, jnp.zeros((2,), jnp.int32), jax.random.key(0))


def test_tiny_loss_finite_and_grads_flow(family, params):
    batch = {"image": _images(), "label": jnp.zeros((2,), jnp.int32)}
    (loss, metrics), grads = jax.jit(jax.value_and_grad(family.loss, has_aux=True))(
        params, batch, jax.random.key(3), {})
    assert np.isfinite(float(loss))
    for k in ("recon", "kl", "mse", "loss"):
        assert np.isfinite(float(metrics[k])), k
    np.testing.assert_allclose(float(loss), float(metrics["recon"] + family.loss_settings.kl_weight * metrics["kl"]), rtol=1e-6)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    dead = [jax.tree_util.keystr(p) for p, g in flat if not np.all(np.isfinite(g)) or not np.any(np.asarray(g))]
    assert not dead, f"parameters with zero / non-finite gradient: {dead[:10]}"
    # The posterior sample depends on the rng (the loss is stochastic), the same rng gives the same loss.
    l2, _ = family.loss(params, batch, jax.random.key(4), {})
    l3, _ = family.loss(params, batch, jax.random.key(4), {})
    assert float(l2) != float(loss) and float(l2) == float(l3)


def test_loss_l2_and_weight_decay_mask():
    cfg = get_config()
    cfg.loss.recon_loss = "l2"
    fam = build(cfg)
    p = nn.meta.unbox(jax.jit(fam.init)(jax.random.key(0)))
    x = _images()
    loss, m = fam.loss(p, {"image": x, "label": jnp.zeros((2,), jnp.int32)}, jax.random.key(0), {})
    np.testing.assert_allclose(float(m["recon"]), float(m["mse"]) * 32 * 32, rtol=1e-5)  # summed per image
    mask = fam.weight_decay_mask(p)
    assert mask["encoder"]["conv_in"]["kernel"] and not mask["encoder"]["conv_in"]["bias"]
    assert not mask["encoder"]["norm_out"]["scale"]


def test_bfloat16_compute_runs():
    cfg = get_config()
    cfg.compute_dtype = "bfloat16"
    fam = build(cfg)
    p = nn.meta.unbox(jax.jit(fam.init)(jax.random.key(0)))
    x = _images()
    loss, _ = fam.loss(p, {"image": x, "label": jnp.zeros((2,), jnp.int32)}, jax.random.key(0), {})
    assert np.isfinite(float(loss))
    assert fam.encode(p, x)["moments"].dtype == jnp.float32
    assert jax.tree_util.tree_leaves(p)[0].dtype == jnp.float32


# --- posterior ----------------------------------------------------------------------------------------------------
def test_diagonal_gaussian():
    moments = jnp.concatenate([jnp.zeros((2, 3, 3, 4)), jnp.zeros((2, 3, 3, 4))], -1)
    post = DiagonalGaussian(moments)
    np.testing.assert_allclose(post.kl(), np.zeros(2), atol=1e-7)  # N(0, I) vs itself
    big = DiagonalGaussian(jnp.concatenate([jnp.ones((1, 1, 1, 1)), jnp.full((1, 1, 1, 1), 50.0)], -1))
    assert float(big.logvar[0, 0, 0, 0]) == 20.0  # clamped
    mu, lv = 0.5, np.log(0.25)
    post = DiagonalGaussian(jnp.concatenate([jnp.full((1, 1, 1, 1), mu), jnp.full((1, 1, 1, 1), lv)], -1))
    np.testing.assert_allclose(float(post.kl()[0]), 0.5 * (mu ** 2 + 0.25 - 1 - lv), rtol=1e-6)
    s = DiagonalGaussian(jnp.concatenate([jnp.full((4000, 1, 1, 1), mu), jnp.full((4000, 1, 1, 1), lv)], -1))
    draws = np.asarray(s.sample(jax.random.key(0)))
    assert abs(draws.mean() - mu) < 0.03 and abs(draws.std() - 0.5) < 0.03


# --- conv building blocks -------------------------------------------------------------------------------------------
def _init_apply(module, x):
    v = module.init(jax.random.key(0), x)
    return nn.meta.unbox(v), module.apply(v, x)


def test_groupnorm_matches_torch_definition():
    x = np.random.RandomState(0).randn(2, 4, 5, 8).astype(np.float32) * 3 + 1
    v, y = _init_apply(GroupNorm(num_groups=4, epsilon=1e-6), jnp.asarray(x))
    g = x.reshape(2, 4, 5, 4, 2)  # channel c is in group c // 2
    ref = ((g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-6)).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
    assert v["params"]["scale"].shape == (8,)


def test_conv_padding_modes_and_resamplers():
    x = jnp.asarray(np.random.RandomState(0).randn(1, 6, 6, 3), jnp.float32)
    v, y1 = _init_apply(Conv(4, 3, padding=1), x)
    y2 = Conv(4, 3, padding="SAME").apply(v, x)
    np.testing.assert_allclose(y1, y2, atol=1e-6)
    assert v["params"]["kernel"].shape == (3, 3, 3, 4)
    # Downsample == explicit bottom/right zero pad then an unpadded stride-2 conv.
    v, d = _init_apply(Downsample(), x)
    ref = Conv(3, 3, strides=2, padding=0).apply({"params": v["params"]["conv"]},
                                                 jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))
    assert d.shape == (1, 3, 3, 3)
    np.testing.assert_allclose(d, ref, atol=1e-6)
    _, a = _init_apply(Downsample(with_conv=False), x)
    np.testing.assert_allclose(a[0, 0, 0], x[0, :2, :2].mean((0, 1)), atol=1e-6)
    _, u = _init_apply(Upsample(with_conv=False), x)
    assert u.shape == (1, 12, 12, 3) and float(u[0, 3, 2, 1]) == float(x[0, 1, 1, 1])


def test_resnet_block_shortcut_variants():
    x = jnp.asarray(np.random.RandomState(0).randn(1, 4, 4, 32), jnp.float32)
    v, _ = _init_apply(ResnetBlock(64), x)
    assert v["params"]["nin_shortcut"]["kernel"].shape == (1, 1, 32, 64)
    v, y = _init_apply(ResnetBlock(64, shortcut="output", use_bias=False), x)
    assert v["params"]["nin_shortcut"]["kernel"].shape == (1, 1, 64, 64)
    assert "bias" not in v["params"]["conv1"]
    v, y = _init_apply(ResnetBlock(), x)  # same width: identity residual, no shortcut conv
    assert "nin_shortcut" not in v["params"]


def test_attention_fused_qkv_equals_separate():
    x = jnp.asarray(np.random.RandomState(0).randn(2, 3, 3, 32), jnp.float32)
    v, y = _init_apply(AttnBlock(), x)
    p = v["params"]
    fused = {"norm": p["norm"], "proj_out": p["proj_out"],
             "qkv": {"kernel": jnp.concatenate([p[n]["kernel"] for n in "qkv"], -1),
                     "bias": jnp.concatenate([p[n]["bias"] for n in "qkv"], -1)}}
    y2 = AttnBlock(fused_qkv=True).apply({"params": fused}, x)
    np.testing.assert_allclose(y, y2, atol=1e-5)
    # Reference single-head attention in numpy.
    h = np.asarray(GroupNorm().apply({"params": p["norm"]}, x)).reshape(2, 9, 32)
    q, k, val = (h @ np.asarray(p[n]["kernel"][0, 0]) + np.asarray(p[n]["bias"]) for n in "qkv")
    w = q @ k.transpose(0, 2, 1) / np.sqrt(32)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = (w @ val) @ np.asarray(p["proj_out"]["kernel"][0, 0]) + np.asarray(p["proj_out"]["bias"])
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) + o.reshape(2, 3, 3, 32), atol=1e-4)


# --- converter ----------------------------------------------------------------------------------------------------
def _to_torch(params):
    """Inverse of the converter (for testing): jaxgen params -> torch-layout state dict."""
    sd = {}
    for path, v in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(p.key for p in path)
        v = np.asarray(v)
        sd[_torch_name(keys)] = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v
    return sd


def test_converter_round_trip_and_errors(params):
    cfg = get_config()
    sd = _to_torch(params)
    assert "encoder.down.1.block.0.nin_shortcut.weight" in sd and "encoder.mid.block_1.conv1.weight" in sd
    back = convert_kl_vae({**sd, "loss.logvar": np.zeros(())}, cfg)  # LDM loss.* keys are ignored
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, jax.tree_util.tree_map(np.asarray, params))

    with pytest.raises(ValueError, match="missing keys.*decoder.conv_out.bias"):
        convert_kl_vae({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}, cfg)
    with pytest.raises(ValueError, match="unexpected keys.*encoder.extra.weight"):
        convert_kl_vae({**sd, "encoder.extra.weight": np.zeros((4, 4, 1, 1), np.float32)}, cfg)
    bad = dict(sd)
    bad["quant_conv.weight"] = np.zeros((3, 8, 1, 1), np.float32)
    with pytest.raises(ValueError, match="shape mismatches.*quant_conv.weight"):
        convert_kl_vae(bad, cfg)


def test_strict_construction():
    cfg = get_config()
    a, b = build(cfg).model, kl_vae_module(cfg.model)
    assert a == b and a.ch == cfg.model.ch and a.ch_mult == tuple(cfg.model.ch_mult)
    cfg.model.unlock()
    cfg.model.chanels = 8  # a misspelt key is an error, not silently ignored
    with pytest.raises(ConfigError, match="chanels"):
        build(cfg)
    cfg = get_config()
    cfg.loss.recon_loss = "l3"
    with pytest.raises(ConfigError, match="recon_loss"):
        build(cfg)
