"""Parity of jaxgen's FID Inception-v3 with torch-fidelity's FeatureExtractorInceptionV3 (fixture kind 'inception',
README section J). The fixture ships no weights: they are rebuilt from its numpy-only recipe and checked by sha256."""
import hashlib
import math

import jax
import numpy as np
import pytest

from jaxgen.eval.inception import FEATURES, InceptionV3, _check_params, convert_state_dict, preprocess
from tests.parity.fixtures import assert_close, parametrize_fixtures, require


def rebuild_weights(meta: dict) -> dict:
    """The fixture's recipe (`weights.rules` expressions, one default_rng(seed + k) per entry), sha256-checked."""
    rules = meta["weights"]["rules"]
    seed = int(meta["weights"].get("seed", meta.get("seed", 0)))
    sd = {}
    for row in meta["recipe_table"]:
        shape = tuple(row["shape"])
        z = np.random.default_rng(seed + int(row["k"])).standard_normal(shape) if row["rule"] != \
            "bn_num_batches_tracked" else None
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = eval(rules[row["rule"]]["expression"], {"np": np, "math": math},  # noqa: S307 (fixture's own recipe)
                     {"z": z, "fan_in": fan_in, "shape": shape})
        value = np.ascontiguousarray(value)
        assert hashlib.sha256(value.tobytes()).hexdigest() == row["sha256"], f"recipe mismatch for {row['key']}"
        sd[row["key"]] = value
    return sd


@pytest.fixture(scope="module")
def converted():
    cache = {}

    def get(fx):
        if fx.name not in cache:
            params = convert_state_dict(rebuild_weights(fx.meta))
            _check_params(params)
            cache[fx.name] = params
        return cache[fx.name]
    return get


def batches(io):
    return sorted({k.split("_image")[0] for k in io if k.endswith("_image")})


@pytest.mark.parity
@parametrize_fixtures("inception")
def test_inception_parity(fixture, converted):
    fx = require(fixture)
    params = converted(fx)
    io = fx.io
    apply = jax.jit(lambda p, x: InceptionV3().apply({"params": p}, x, mutable=["intermediates"]))
    checked = 0
    for b in batches(io):
        images = np.asarray(io[f"{b}_image"]).transpose(0, 2, 3, 1)  # NCHW uint8 -> NHWC
        if f"{b}_resized_img0_ch0" in io:
            resized = np.asarray(preprocess(images[:1]))[0, :, :, 0] * 128.0 + 128.0
            assert_close(f"{b}_resized_img0_ch0", resized, io[f"{b}_resized_img0_ch0"], atol=1e-4, rtol=0)
            checked += 1
        feats, state = apply(params, images)
        inter = state["intermediates"]
        for name in FEATURES:
            key = f"{b}_feat_{name}"
            if key in io:
                assert_close(key, feats[name], io[key], atol=1e-4, rtol=1e-4)
                checked += 1
        for key in io:
            if key.startswith(f"{b}_") and (key.endswith("_spatialmean") or key.endswith("_crop")):
                child = key[len(b) + 1:].rsplit("_", 1)[0]
                out = np.asarray(inter[child + "_out"][0])  # NHWC
                ours = out.mean((1, 2)) if key.endswith("_spatialmean") else \
                    out[:, :4, :4, :16].transpose(0, 3, 1, 2)
                assert_close(key, ours, io[key], atol=1e-4, rtol=1e-4)
                checked += 1
    assert checked >= 20, f"fixture {fx.name}: only {checked} arrays compared"
