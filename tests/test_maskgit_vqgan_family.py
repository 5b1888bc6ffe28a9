"""MaskGITVQGANFamily: the tokenizer protocol over [-1, 1] images, the loss terms and metrics, the decay mask."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import maskgit_vqgan_tiny
from jaxgen import families
from jaxgen.errors import ConfigError
from jaxgen.families.maskgit_vqgan import entropy_loss


def _family(**loss):
    c = maskgit_vqgan_tiny.get_config()
    c.loss.update(loss)
    return families.build(c)


def test_protocol_maps_images_to_the_modules_range_and_back():
    fam = _family()
    params = nn.meta.unbox(jax.jit(fam.init)(jax.random.PRNGKey(0)))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 1)), jnp.float32)
    codes = jax.jit(fam.encode)(params, x)
    assert codes["indices"].shape == (2, 64) and codes["indices"].dtype == jnp.int32
    from jaxgen.tokenizers.maskgit_vqgan import MaskGITVQGAN
    direct = fam.model.apply({"params": params}, (x + 1) / 2, method=MaskGITVQGAN.encode_to_indices)
    np.testing.assert_array_equal(np.asarray(codes["indices"]), np.asarray(direct).reshape(2, -1))
    recon = jax.jit(fam.decode)(params, codes)
    x01 = fam.model.apply({"params": params}, codes["indices"], method=MaskGITVQGAN.decode_indices)
    np.testing.assert_allclose(np.asarray(recon), np.asarray(x01) * 2 - 1, atol=1e-5)  # jitted vs op-by-op rounding
    with pytest.raises(ConfigError, match="decodes"):
        fam.decode(params, {"latent": x})


def test_loss_terms_metrics_and_decay_mask():
    fam = _family(entropy_weight=0.1)
    params = nn.meta.unbox(jax.jit(fam.init)(jax.random.PRNGKey(0)))
    batch = {"image": jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (8, 32, 32, 1)), jnp.float32),
             "label": jnp.zeros((8,), jnp.int32)}
    (loss, m), grads = jax.jit(jax.value_and_grad(fam.loss, has_aux=True))(params, batch, jax.random.PRNGKey(2), {})
    s = fam.loss_settings
    total = m["recon_mse"] + s.vq_weight * m["vq_loss"] + s.dead_code_weight * m["dead_code"] + 0.1 * m["entropy"]
    np.testing.assert_allclose(float(loss), float(total), rtol=1e-5)
    assert 0 < float(m["code_usage"]) <= 1 and float(m["perplexity"]) >= 1
    assert float(jnp.abs(grads["quantize"]["embedding"]).max()) > 0  # the codebook learns (VQ + dead-code terms)
    mask = fam.weight_decay_mask(params)
    assert not mask["quantize"]["embedding"] and mask["encoder"]["conv_in"]["kernel"]


def test_entropy_term_rewards_confident_and_diverse_assignments():
    codebook = jnp.eye(4, dtype=jnp.float32)
    diverse = jnp.eye(4, dtype=jnp.float32)  # each row sits on its own code
    collapsed = jnp.tile(codebook[:1], (4, 1))  # every row on code 0
    assert float(entropy_loss(diverse, codebook, 0.01)) < float(entropy_loss(collapsed, codebook, 0.01))
