"""Parity of jaxgen's MaskGIT-VQGAN with the official bytedance/1d-tokenizer tokenizer (fixture kind 'maskgit_vqgan',
README section G), and the full-size key / shape manifest (section H)."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.convert.maskgit_vqgan import build_from_official, convert_maskgit_vqgan, expected_shapes, \
    maskgit_vqgan_key_map
from jaxgen.tokenizers.maskgit_vqgan import MaskGITVQGAN
from tests.parity.fixtures import assert_close, assert_equal_int, parametrize_fixtures, parity_dir, require

pytestmark = pytest.mark.parity

ATOL = RTOL = 1e-4
INT_OUTPUTS = ("codes",)


def nhwc(x):
    return jnp.asarray(np.moveaxis(np.asarray(x), -3, -1))  # (B, C, H, W) -> (B, H, W, C)


def nchw(x):
    return np.moveaxis(np.asarray(x), -1, -3)


@parametrize_fixtures("maskgit_vqgan")
def test_maskgit_vqgan_parity(fixture):
    fx = require(fixture)
    io = fx.io
    model = build_from_official(fx.meta["constructor_kwargs"])
    variables = {"params": jax.tree_util.tree_map(jnp.asarray, convert_maskgit_vqgan(fx.weights, model))}
    call = lambda method, *a: model.apply(variables, *a, method=method)  # noqa: E731
    b = io["image"].shape[0]

    # every stage is fed the reference's input, so a mismatch points at one stage
    enc_ref = nhwc(io["encoder_out"])
    idx_of_ref, quantized = call(MaskGITVQGAN.quantize, enc_ref)
    ours = {
        "encoder_out": nchw(call(MaskGITVQGAN.encode, nhwc(io["image"]))),
        "quantized": nchw(quantized),
        "codes": np.asarray(call(MaskGITVQGAN.encode_to_indices, nhwc(io["image"]))).reshape(b, -1),
        "decode": nchw(call(MaskGITVQGAN.decode_indices, jnp.asarray(io["codes"], jnp.int32))),
        "decode_random_codes": nchw(call(MaskGITVQGAN.decode_indices, jnp.asarray(io["random_codes"], jnp.int32))),
        "decoder_out_unclamped": nchw(call(lambda m, c: m.decode(m.embed(c)),
                                           jnp.asarray(io["random_codes"], jnp.int32))),
    }
    outputs = [k for k, v in fx.meta["arrays"].items() if v.get("role") == "output"]
    assert set(outputs) <= set(ours), f"fixture has outputs this test does not know: {set(outputs) - set(ours)}"
    assert outputs, "fixture lists no outputs"
    # the quantizer on the reference encoder output must pick the reference codes too
    assert_equal_int("codes (quantize of reference encoder_out)", np.asarray(idx_of_ref).reshape(b, -1), io["codes"])
    for name in outputs:
        if name in INT_OUTPUTS:
            assert_equal_int(name, ours[name], io[name])
            print(f"[maskgit_vqgan:{fx.name}] {name}: exact ({io[name].size} codes)")
        else:
            d, r = assert_close(name, ours[name], io[name], ATOL, RTOL)
            print(f"[maskgit_vqgan:{fx.name}] {name}: max|diff| {d:.3e}  max|diff|/max|ref| {r:.3e}")


def test_maskgit_vqgan_manifest_maps_onto_params():
    path = os.path.join(parity_dir(), "manifests", "maskgit_vqgan.json")
    if not os.path.exists(path):
        pytest.fail(f"missing manifest {path} (set JAXGEN_PARITY_DIR)")
    manifest = json.load(open(path))
    shapes = {k: v["shape"] for k, v in manifest["state_dict"].items()}
    model = MaskGITVQGAN()  # the defaults are the official PretrainedTokenizer config

    plan = maskgit_vqgan_key_map(shapes, model)  # raises on any missing / unexpected key or shape mismatch
    assert set(plan) == set(shapes)
    want = expected_shapes(model)
    assert len(want) == len(shapes) == manifest.get("num_state_dict_entries", len(shapes))
    assert {p for p, _ in plan.values()} == set(want)
    n = sum(math.prod(s) for s in want.values())
    assert n == manifest["num_float_elements"], (n, manifest["num_float_elements"])
    assert want[("quantize", "embedding")] == tuple(shapes["quantize.embedding.weight"])
