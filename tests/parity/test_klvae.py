"""Parity of jaxgen's KL-VAE with the official MAR AutoencoderKL (fixture kind 'klvae', README section C)."""
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxgen.convert.kl_vae import convert_kl_vae, kl_vae_module
from jaxgen.tokenizers.kl_vae import AutoencoderKL, DiagonalGaussian
from tests.parity.fixtures import assert_close, parametrize_fixtures, require

OUTPUTS = ("encoder_out", "moments", "mean", "logvar", "std", "decode", "decode_of_mean")


def model_config(meta: dict) -> ml_collections.ConfigDict:
    """Model config from the fixture: constructor kwargs, plus ch / resolution the generator injected (its `deviation`
    text) where present; otherwise the official Encoder/Decoder defaults."""
    kw = meta["constructor_kwargs"]
    deviation = str(meta.get("deviation", ""))
    find = lambda name, default: int(m.group(1)) if (m := re.search(rf"\b{name}=(\d+)", deviation)) else default  # noqa
    return ml_collections.ConfigDict(dict(
        ch=find("ch", 128), resolution=find("resolution", 256), ch_mult=tuple(kw["ch_mult"]),
        attn_resolutions=(16,), embed_dim=int(kw["embed_dim"]), z_channels=int(kw["embed_dim"]),
        use_variational=bool(kw.get("use_variational", True))))


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


@pytest.mark.parity
@parametrize_fixtures("klvae")
def test_klvae_parity(fixture):
    fx = require(fixture)
    cfg = model_config(fx.meta)
    model = kl_vae_module(cfg)
    params = {"params": convert_kl_vae(fx.weights, cfg)}
    io = fx.io

    image = nhwc(io["image"])
    moments = model.apply(params, image, method=AutoencoderKL.encode)
    post = DiagonalGaussian(moments)
    ours = {
        "encoder_out": model.apply(params, image, method=lambda m, x: m.encoder(x)),
        "moments": moments, "mean": post.mean, "logvar": post.logvar, "std": post.std,
        "decode": model.apply(params, nhwc(io["z"]), method=AutoencoderKL.decode),
        "decode_of_mean": model.apply(params, post.mean, method=AutoencoderKL.decode),
    }
    outputs = [n for n, a in fx.meta["arrays"].items() if a.get("role") == "output"]
    assert set(outputs) <= set(OUTPUTS), f"fixture has outputs this test does not know: {set(outputs) - set(OUTPUTS)}"
    for name in outputs:
        max_diff, rel = assert_close(name, nchw(ours[name]), io[name], atol=1e-4, rtol=1e-4)
        print(f"{fx.name}.{name}: max|diff| {max_diff:.3e}  max|diff|/max|ref| {rel:.3e}")
