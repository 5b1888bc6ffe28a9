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


@pytest.mark.parity
@parametrize_fixtures("inception")
def test_inception_loads_a_torch_file_without_torch(fixture, tmp_path):
    """The user's .pth (a torch zip checkpoint, written here without torch) -> InceptionFID -> the fixture's features;
    a state_dict with a missing entry is refused with the entry named."""
    from jaxgen.eval.inception import InceptionFID
    from tests import torch_format

    fx = require(fixture)
    sd = rebuild_weights(fx.meta)
    path = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch_format.save({k: torch_format.Tensor.of(v) for k, v in sd.items()}, str(path))
    net = InceptionFID.load(str(path), batch_size=2)
    for b in batches(fx.io):
        images = np.asarray(fx.io[f"{b}_image"]).transpose(0, 2, 3, 1)
        feats = net(images, features=("2048", "logits_unbiased"))
        assert_close(f"{b}_feat_2048", feats["2048"], fx.io[f"{b}_feat_2048"], atol=1e-4, rtol=1e-4)
        assert_close(f"{b}_feat_logits_unbiased", feats["logits_unbiased"], fx.io[f"{b}_feat_logits_unbiased"],
                     atol=1e-4, rtol=1e-4)
    broken = {k: v for k, v in sd.items() if k != "Mixed_6b.branch7x7_2.bn.running_var"}
    with pytest.raises(KeyError, match="Mixed_6b.branch7x7_2.bn.running_var"):
        convert_state_dict(broken)
