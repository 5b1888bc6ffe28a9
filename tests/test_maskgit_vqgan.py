"""MaskGIT-VQGAN tokenizer: shapes, training forward (straight-through gradients), converter round trip and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.errors import ConfigError

from jaxgen.convert.maskgit_vqgan import build_from_official, convert_maskgit_vqgan, fields_from_official, torch_key
from jaxgen.nn.quantizer import commitment_loss
from jaxgen.tokenizers.maskgit_vqgan import MaskGITVQGAN, maskgit_vqgan_from_config

TINY = dict(hidden_channels=16, channel_mult=(1, 2), num_res_blocks=1, z_channels=8, codebook_size=16,
            resolution=16, num_groups=8)


@pytest.fixture(scope="module")
def tiny():
    model = maskgit_vqgan_from_config(TINY)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    params = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))["params"]
    return model, jax.tree_util.tree_map(lambda p: getattr(p, "value", p), params,
                                         is_leaf=lambda p: hasattr(p, "value")), x


def test_round_trip_shapes(tiny):
    model, params, x = tiny
    v = {"params": params}
    idx = model.apply(v, x, method=MaskGITVQGAN.encode_to_indices)
    assert idx.shape == (2, 8, 8) and idx.dtype == jnp.int32
    assert int(idx.min()) >= 0 and int(idx.max()) < TINY["codebook_size"]
    img = model.apply(v, idx, method=MaskGITVQGAN.decode_indices)
    assert img.shape == (2, 16, 16, 3) and float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    # (B, h*w) codes read row-major give the same images (official get_codebook_entry)
    np.testing.assert_array_equal(model.apply(v, idx.reshape(2, -1), method=MaskGITVQGAN.decode_indices), img)
    z = model.apply(v, x, method=MaskGITVQGAN.encode)
    idx2, zq = model.apply(v, z, method=MaskGITVQGAN.quantize)
    np.testing.assert_array_equal(idx2, idx)
    np.testing.assert_array_equal(zq, params["quantize"]["embedding"][idx])
    assert params["quantize"]["embedding"].shape == (16, 8)


def test_training_forward_and_straight_through(tiny):
    model, params, x = tiny

    def losses(p):
        out = model.apply({"params": p}, x, train=True)
        return jnp.mean(jnp.square(out["recon"] - x)), out

    def total(p):
        rec, out = losses(p)
        return rec + out["vq_loss"], out

    (loss, out), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(params)
    assert np.isfinite(float(loss)) and np.isfinite(float(out["vq_loss"]))
    assert out["counts"].shape == (16,) and float(out["counts"].sum()) == 2 * 8 * 8
    assert out["idx"].shape == (2, 8, 8)
    norm = lambda t: float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(t))))  # noqa: E731
    assert norm(grads["quantize"]) > 0 and norm(grads["encoder"]) > 0 and norm(grads["decoder"]) > 0
    # the reconstruction alone reaches the encoder only through the straight-through estimator
    rec_grads = jax.jit(jax.grad(lambda p: losses(p)[0]))(params)
    assert norm(rec_grads["encoder"]["conv_in"]) > 0
    assert norm(rec_grads["quantize"]) == 0.0  # the decoder sees z + sg(z_q - z): no path to the codebook


def test_commitment_loss_beta_placement():
    z = jnp.asarray(np.random.RandomState(0).randn(4, 3), jnp.float32)
    q = jnp.asarray(np.random.RandomState(1).randn(4, 3), jnp.float32)
    d = (2.0 / z.size) * (q - z)
    gz, gq = jax.grad(lambda a, b: commitment_loss(a, b, 0.25, beta_on="codebook"), (0, 1))(z, q)
    np.testing.assert_allclose(gz, -d, rtol=1e-6)  # MaskGIT: full weight on the encoder term
    np.testing.assert_allclose(gq, 0.25 * d, rtol=1e-6)
    gz, gq = jax.grad(lambda a, b: commitment_loss(a, b, 0.25), (0, 1))(z, q)  # default unchanged
    np.testing.assert_allclose(gz, -0.25 * d, rtol=1e-6)
    np.testing.assert_allclose(gq, d, rtol=1e-6)


def _to_torch(params):
    sd = {}
    for path, v in jax.tree_util.tree_leaves_with_path(params):
        key, transform = torch_key(tuple(p.key for p in path))
        v = np.asarray(v)
        sd[key] = v.transpose(3, 2, 0, 1) if transform == "conv" else v
    return sd


def test_converter_round_trip_and_errors(tiny):
    model, params, _ = tiny
    sd = _to_torch(params)
    assert {"encoder.down.0.block.0.conv1.weight", "encoder.mid.0.norm1.weight", "decoder.up.1.upsample_conv.bias",
            "decoder.up.0.block.0.nin_shortcut.weight", "quantize.embedding.weight"} <= set(sd)
    back = convert_maskgit_vqgan(sd, TINY)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, jax.tree_util.tree_map(np.asarray, params))

    with pytest.raises(ValueError, match="missing key 'decoder.conv_out.bias'"):
        convert_maskgit_vqgan({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}, model)
    with pytest.raises(ValueError, match="unexpected keys: encoder.extra.weight"):
        convert_maskgit_vqgan({**sd, "encoder.extra.weight": np.zeros((1, 1, 1, 1), np.float32)}, model)
    with pytest.raises(ValueError, match="shape mismatches: quantize.embedding.weight"):
        convert_maskgit_vqgan({**sd, "quantize.embedding.weight": np.zeros((17, 8), np.float32)}, model)


def test_config_helpers():
    official = {"encoder/decoder config": {"channel_mult": [1, 2], "num_resolutions": 2, "dropout": 0.0,
                                           "hidden_channels": 32, "num_channels": 3, "num_res_blocks": 1,
                                           "resolution": 16, "z_channels": 8},
                "quantize": {"num_embeddings": 16, "embedding_dim": 8, "commitment_cost": 0.25}}
    fields = fields_from_official(official)
    assert fields["codebook_size"] == 16 and fields["channel_mult"] == (1, 2) and "num_resolutions" not in fields
    assert build_from_official(official).hidden_channels == 32
    with pytest.raises(ValueError, match="unknown official keys"):
        fields_from_official({**official, "quantize": {"num_embeddings": 16, "use_l2_norm": True}})
    with pytest.raises(ValueError, match="num_resolutions"):
        fields_from_official({"channel_mult": [1, 2], "num_resolutions": 3})
    with pytest.raises(ValueError, match="embedding_dim"):
        fields_from_official({"z_channels": 8, "embedding_dim": 4})
    with pytest.raises(ConfigError, match="does not take"):
        maskgit_vqgan_from_config({"hidden": 8})
    assert maskgit_vqgan_from_config({"dtype": "bfloat16"}).dtype == jnp.bfloat16
