"""`python -m jaxgen.convert --family=rar|maskgit_vqgan` on flat state dicts (.npz) of the tiny configs' models:
the written params checkpoint holds exactly the original params."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxgen import config as config_lib
from jaxgen import families
from jaxgen.train import export
from tests.cli_utils import REPO, env, tail
from tests.test_maskgit_vqgan import _to_torch
from tests.test_rar_model import _torch_state_dict


@pytest.mark.parametrize("family_name,config_name", [("rar", "rar_tiny"), ("maskgit_vqgan", "maskgit_vqgan_tiny")])
def test_convert_cli_round_trip(tmp_path, family_name, config_name):
    config = config_lib.load(config_name)
    fam = families.build(config)
    params = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(jax.jit(fam.init)(jax.random.PRNGKey(0))))
    sd = _torch_state_dict(fam.model, params) if family_name == "rar" else _to_torch(params)
    np.savez(tmp_path / "sd.npz", **sd)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "jaxgen.convert", f"--family={family_name}",
                           f"--config=configs/{config_name}.py", f"--input={tmp_path / 'sd.npz'}", f"--output={out}"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, tail(proc)
    assert export.load_meta(str(out))["family"] == family_name
    back = export.load_params(str(out))
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    assert os.path.isdir(out / "params")
