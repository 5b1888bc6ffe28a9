"""Every key of the official full-size KL-16 state dict maps onto configs/kl16.py params with the right shape (abstract:
shapes only, no weights are allocated)."""
import json
import math
import os

import pytest

from configs.kl16 import get_config
from jaxgen.convert.kl_vae import expected_shapes, kl_vae_key_map, kl_vae_module
from tests.parity.fixtures import parity_dir


@pytest.mark.parity
def test_kl16_manifest_maps_onto_params():
    path = os.path.join(parity_dir(), "manifests", "mar_kl16_vae.json")
    if not os.path.exists(path):
        pytest.fail(f"missing manifest {path} (set JAXGEN_PARITY_DIR)")
    manifest = json.load(open(path))
    shapes = {k: v["shape"] for k, v in manifest["state_dict"].items()}
    config = get_config()

    plan = kl_vae_key_map(shapes, config)  # raises on any missing / unexpected key or shape mismatch
    assert set(plan) == set(shapes)
    want = expected_shapes(kl_vae_module(config))
    assert len(want) == len(shapes) and {p for p, _ in plan.values()} == set(want)
    n = sum(math.prod(s) for s in want.values())
    assert n == manifest["num_float_elements"], (n, manifest["num_float_elements"])
