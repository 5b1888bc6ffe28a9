"""Full-size VAR: every official state_dict key of the VQVAE and of VAR-d16/20/24/30 lands on a param of
configs/vqvae_256.py / configs/var_d{16,20,24,30}.py with the right shape.

Nothing is allocated: the converters read zero-stride broadcast views standing in for the weights (views=True keeps
them views), and the reference params come from `jax.eval_shape` of the families' own `init`.
"""
import json
import os

import jax
import numpy as np
import pytest

from configs import var_d16, var_d20, var_d24, var_d30, vqvae_256
from jaxgen.convert.torch_layout import check_tree_shapes
from jaxgen.convert.var import VAR_IGNORED_RE, VQVAE_IGNORED, convert_var, convert_vqvae
from jaxgen.families.msvq import MSVQFamily
from jaxgen.families.var.family import VARFamily
from jaxgen.parallel.sharding import unbox
from tests.parity.fixtures import parity_dir

VAR_CASES = [("var_d16", var_d16), ("var_d20", var_d20), ("var_d24", var_d24), ("var_d30", var_d30)]


def _manifest(name):
    path = os.path.join(parity_dir(), "manifests", f"{name}.json")
    if not os.path.exists(path):
        pytest.fail(f"manifest {path} missing (set JAXGEN_PARITY_DIR)")
    return json.load(open(path))


def _fake_state_dict(manifest):
    zeros = {"float32": np.zeros((), np.float32), "int64": np.zeros((), np.int64)}
    return {k: np.broadcast_to(zeros[v["dtype"]], tuple(v["shape"])) for k, v in manifest["state_dict"].items()}


def _size(tree):
    return sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree))


def _skipped_floats(manifest, skipped):
    """Float elements of the buffers the converter skips on purpose (counted in the manifest's num_float_elements)."""
    return sum(int(np.prod(v["shape"])) for k, v in manifest["state_dict"].items()
               if skipped(k) and v["dtype"].startswith("float"))


def _check(manifest, params, family, skipped):
    reference = unbox(jax.eval_shape(family.init, jax.random.PRNGKey(0)))
    check_tree_shapes(params, reference, "converted params vs the config's model")  # names every mismatch
    n_entries = sum(1 for k in manifest["state_dict"] if not skipped(k))
    assert len(jax.tree_util.tree_leaves(params)) == n_entries
    assert _size(reference) + _skipped_floats(manifest, skipped) == manifest["num_float_elements"]
    return _size(reference)


@pytest.mark.parity
def test_vqvae_manifest():
    manifest = _manifest("var_vqvae")
    config = vqvae_256.get_config()
    params = convert_vqvae(_fake_state_dict(manifest), config, views=True)
    n = _check(manifest, params, MSVQFamily(config), lambda k: k in VQVAE_IGNORED)
    print(f"var_vqvae: {n:,} parameters match")


@pytest.mark.parity
@pytest.mark.parametrize("manifest_name,config_module", VAR_CASES, ids=[c[0] for c in VAR_CASES])
def test_var_manifest(manifest_name, config_module):
    manifest = _manifest(manifest_name)
    config = config_module.get_config()
    params = convert_var(_fake_state_dict(manifest), config, views=True)
    n = _check(manifest, params, VARFamily(config), lambda k: bool(VAR_IGNORED_RE.match(k)))
    print(f"{manifest_name}: {n:,} parameters match")
