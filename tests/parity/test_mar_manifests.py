"""Full-size MAR-B/L/H: every official state_dict key lands on a param of configs/mar_{b,l,h}.py with the right shape.

The model is built abstractly (jax.eval_shape, nothing allocated); the converter reads zero-stride broadcast views
standing in for the weights, and `convert_mar` itself checks the converted tree against the model, key by key.
"""
import json
import os

import jax
import numpy as np
import pytest

from configs import mar_b, mar_h, mar_l
from jaxgen.convert.mar import convert_mar
from jaxgen import families
from jaxgen.train.restore import abstract_params
from tests.parity.fixtures import parity_dir

CASES = [("mar_base", mar_b), ("mar_large", mar_l), ("mar_huge", mar_h)]


def _fake_state_dict(manifest):
    zero = np.zeros((), np.float32)
    return {k: np.broadcast_to(zero, tuple(v["shape"])) for k, v in manifest["state_dict"].items()}


@pytest.mark.parity
@pytest.mark.parametrize("manifest_name,config_module", CASES, ids=[c[0] for c in CASES])
def test_mar_manifest(manifest_name, config_module):
    path = os.path.join(parity_dir(), "manifests", f"{manifest_name}.json")
    assert os.path.exists(path), f"manifest {path} missing (set JAXGEN_PARITY_DIR)"
    manifest = json.load(open(path))
    config = config_module.get_config()
    params = convert_mar(_fake_state_dict(manifest), config)  # raises on any missing/unexpected key or shape

    ref = abstract_params(families.build(config))
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(ref))
    n_conv = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
    assert n_ours == n_conv == manifest["num_float_elements"], (n_ours, n_conv, manifest["num_float_elements"])
    assert len(jax.tree_util.tree_leaves(params)) == manifest["num_state_dict_entries"]
    print(f"{manifest_name}: {manifest['num_state_dict_entries']} keys, {n_ours:,} parameters match")


@pytest.mark.parity
def test_mar_manifest_scan_layout():
    """The stacked (scan_layers) layout receives the same keys: MAR-B with config.scan_layers."""
    manifest = json.load(open(os.path.join(parity_dir(), "manifests", "mar_base.json")))
    config = mar_b.get_config()
    config.scan_layers = True
    params = convert_mar(_fake_state_dict(manifest), config)
    qkv = params["encoder_blocks"]["layers"]["block"]["attn"]["qkv"]["kernel"]
    assert qkv.shape == (config.model.encoder_depth, 768, 3 * 768)
