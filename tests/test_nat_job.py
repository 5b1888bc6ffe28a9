"""NAT end to end through the command line (`configs/nat_tiny.py:runlocal`): train both stages, `--mode=search`
(state on disk, resumed when asked for more updates), `--mode=eval --overrides=best_policy.json`, one-line errors;
and `python -m jaxgen.convert --family=nat` on an official-layout U-ViT state dict."""
import json
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxgen import config as config_lib
from jaxgen import families
from jaxgen.convert.autonat import _BLOCK
from jaxgen.train import export
from tests.cli_utils import REPO, assert_one_line_error, env, run_main, tail

CONFIG = "--config=configs/nat_tiny.py:runlocal"
SEARCH = ["--mode=search", "--config.search.num_samples=20", "--config.search.knobs=('guidance',)"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("nat")
    proc = run_main([CONFIG, f"--workdir={workdir}"])
    assert proc.returncode == 0, tail(proc)
    return workdir


def test_search_resumes_and_its_policy_is_an_override(trained):
    proc = run_main([CONFIG, f"--workdir={trained}", *SEARCH, "--config.search.updates=1"])
    assert proc.returncode == 0, tail(proc)
    state = json.load(open(trained / "search" / "state.json"))["state"]
    assert state["update"] == 1 and state["evaluations"] == 1 + 4 + 1  # base, 4 guidance entries, new base
    first = state["history"]
    proc = run_main([CONFIG, f"--workdir={trained}", *SEARCH, "--config.search.updates=2"])
    assert proc.returncode == 0, tail(proc)
    state = json.load(open(trained / "search" / "state.json"))["state"]
    assert "resuming at update 1" in proc.stderr
    assert state["update"] == 2 and state["evaluations"] == 11 and state["history"][:2] == first
    best = json.load(open(trained / "search" / "best_policy.json"))
    assert list(best) == ["sample.guidance"] and len(best["sample.guidance"]) == 4
    header = open(trained / "search" / "history.csv").readline()
    assert header.startswith("update,metric,guidance[0]")

    proc = run_main([CONFIG, f"--workdir={trained}", "--mode=eval", f"--overrides={trained}/search/best_policy.json"])
    assert proc.returncode == 0, tail(proc)
    assert json.load(open(trained / "eval.json"))["num_samples"] == 20

    other = run_main([CONFIG, f"--workdir={trained}", *SEARCH, "--config.search.seed=5"])
    assert_one_line_error(other, "search with other settings")
    bad = trained / "bad.json"
    bad.write_text(json.dumps({"sample.guidanse": [0.0] * 4}))
    assert_one_line_error(run_main([CONFIG, f"--workdir={trained}", "--mode=sample", f"--overrides={bad}"]),
                          "no key 'sample.guidanse'")


def _official_uvit(params, half):
    sd = {}
    for e in ("token_emb", "context_embed"):
        for t in ("word_embeddings", "position_embeddings"):
            sd[f"{e}.{t}.weight"] = params[e][t]["embedding"]
        sd[f"{e}.LayerNorm.weight"] = params[e]["LayerNorm"]["scale"]
        sd[f"{e}.LayerNorm.bias"] = params[e]["LayerNorm"]["bias"]
    blocks = {f"in_blocks.{i}": params[f"in_blocks_{i}"] for i in range(half)}
    blocks.update({f"out_blocks.{i}": params[f"out_blocks_{i}"] for i in range(half)}, mid_block=params["mid_block"])
    for prefix, blk in blocks.items():
        for name, path, kind in _BLOCK:
            node = blk
            for p in path:
                node = node[p]
            sd[f"{prefix}.{name}.weight"] = node["scale"] if kind == "norm" else node["kernel"].T
            if kind != "linear_nobias":
                sd[f"{prefix}.{name}.bias"] = node["bias"]
    for i in range(half):
        sd[f"out_blocks.{i}.skip_linear.weight"] = params[f"skip_linears_{i}"]["kernel"].T
        sd[f"out_blocks.{i}.skip_linear.bias"] = params[f"skip_linears_{i}"]["bias"]
    m = params["mlm_layer"]
    sd.update({"norm.weight": params["norm"]["scale"], "norm.bias": params["norm"]["bias"], "mlm_layer.bias": m["bias"],
               "mlm_layer.fc.weight": m["fc"]["kernel"].T, "mlm_layer.fc.bias": m["fc"]["bias"],
               "mlm_layer.ln.weight": m["ln"]["scale"], "mlm_layer.ln.bias": m["ln"]["bias"]})
    return sd


def test_convert_cli_autonat_round_trip(tmp_path):
    config = config_lib.load("nat_tiny")
    fam = families.build(config)
    params = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(jax.jit(fam.init)(jax.random.PRNGKey(0))))
    sd = _official_uvit(params, fam.model.depth // 2)
    assert len(sd) == 8 + 11 * 5 + 2 * 2 + 2 + 5 == 74  # the official U-ViT key count for depth 4
    np.savez(tmp_path / "nnet_ema.npz", **sd)
    proc = subprocess.run([sys.executable, "-m", "jaxgen.convert", "--family=nat", "--config=configs/nat_tiny.py",
                           f"--input={tmp_path / 'nnet_ema.npz'}", f"--output={tmp_path / 'out'}"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, tail(proc)
    jax.tree_util.tree_map(np.testing.assert_array_equal, export.load_params(str(tmp_path / "out")), params)


def test_sampling_sharded_over_eight_devices_matches_one(trained):
    """The decode loop runs with the batch sharded over 8 simulated devices and gives the 1-device samples."""
    out = {}
    for devices in (1, 8):
        proc = run_main([CONFIG, f"--workdir={trained}", "--mode=sample", "--config.sample.batch_size=8"],
                        devices=devices)
        assert proc.returncode == 0, tail(proc)
        with np.load(trained / "samples" / "samples.npz") as z:
            out[devices] = z["images"].astype(np.int32)
    assert out[1].shape == (20, 32, 32, 1)
    # float reductions may differ across shardings: allow a few differing pixels, not different images
    assert np.mean(out[1] != out[8]) < 0.01, np.mean(out[1] != out[8])
