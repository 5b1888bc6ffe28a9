"""The main job end to end through its command line, on a few steps (`configs/mar_tiny.py:runlocal`):
tokenizer stage -> latent cache -> MAR, then --mode=sample and --mode=eval, then the inference notebook."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.cli_utils import REPO, env, run_main, tail

CONFIG = "--config=configs/mar_tiny.py:runlocal"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mar_tiny")
    proc = run_main([CONFIG, f"--workdir={workdir}"])
    assert proc.returncode == 0, tail(proc)
    (workdir / "console.txt").write_text(proc.stderr)
    return workdir


def test_console_is_compact_and_the_tables_go_to_the_workdir(trained):
    console = (trained / "console.txt").read_text()
    lines = console.splitlines()
    header1 = next(l for l in lines if "[stage 1/2 (tokenizer)] kl_vae: " in l)
    header2 = next(l for l in lines if "[stage 2/2] mar: " in l)
    for header in (header1, header2):
        assert "params | mesh data=1 x fsdp=1 x tensor=1 (1 devices, 1 processes) | batch 16 (16 per device)" in header
        assert "float32 compute" in header
    assert not [l for l in lines if l.lstrip().startswith("|")], "a parameter table was printed to the console"
    assert len(lines) < 60, console
    for w in (trained, trained / "tokenizer"):
        assert "Total" in (w / "parameters.txt").read_text() and "-> P(" in (w / "sharding.txt").read_text()
    assert any("[cache kl_vae codes] 4500/4500 images (100%)" in l for l in lines)
    assert any("[mar] step 10/10 (100%)" in l and "ETA" in l for l in lines)


def test_train_writes_every_stage(trained):
    w = trained
    # stage 1: the tokenizer run, exported for the generator
    assert os.path.isdir(w / "tokenizer" / "checkpoints" / "10")
    assert os.path.isdir(w / "tokenizer" / "export")
    # the code cache of all 4,500 training digits and their flips
    meta = json.load(open(w / "code_cache" / "meta.json"))
    assert meta["num_examples"] == 4500 and meta["keys"]["moments"]["shape"] == [8, 8, 8]
    # stage 2: MAR checkpoints, export, metrics, TensorBoard events and a sample grid
    assert os.path.isdir(w / "checkpoints" / "10") and os.path.isdir(w / "export")
    rows = [json.loads(line) for line in open(w / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [5, 10]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(w / "tb"))
    assert os.path.isfile(w / "samples" / "train_grid_00000010.png")
    config = json.load(open(w / "config.json"))
    assert config["family"] == "mar" and config["tokenizer"]["config"]["family"] == "kl_vae"


def test_sample_mode(trained):
    proc = run_main([CONFIG, f"--workdir={trained}", "--mode=sample"])
    assert proc.returncode == 0, tail(proc)
    assert "[sample] 20/20 images (100%)" in proc.stderr
    with np.load(trained / "samples" / "samples.npz") as z:
        images, labels = z["images"], z["labels"]
    assert images.dtype == np.uint8 and images.shape == (20, 32, 32, 1)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 2))
    assert os.path.isfile(trained / "samples" / "grid.png")



def test_inference_notebook_runs(trained):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(REPO, "notebooks", "sample.ipynb"), as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    params.source = (f'CONFIG = "configs/mar_tiny.py:runlocal"\nWORKDIR = "{trained}"\nTOKENIZER = ""\n'
                     f'OVERRIDES = {{}}\nCLASSES = [3, 7]\nPER_CLASS = 2\nSEED = 0')
    for key, value in env().items():  # the kernel inherits this process's environment
        os.environ.setdefault(key, value)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook showed no sample grid"
    assert any("4 images (32, 32, 1)" in "".join(o.get("text", "")) for o in outputs)


def test_eval_survives_kill_9_and_resumes_to_the_same_result(trained, tmp_path):
    """--mode=eval in 5 shards: an uninterrupted run (the digit metric in range), then a run killed (SIGKILL) after its
    first shard and resumed; the resumed eval.json and samples.npz equal the uninterrupted ones, and finished shards
    are not regenerated."""
    import shutil
    import signal
    import subprocess
    import time

    from tests.cli_utils import main_cmd

    args = [CONFIG, f"--workdir={trained}", "--mode=eval", "--config.sample.batch_size=4",
            "--config.eval.shard_size=4"]

    def clean():
        shutil.rmtree(trained / "eval", ignore_errors=True)
        for f in ("eval.json", "samples/samples.npz"):
            (trained / f).unlink(missing_ok=True)

    clean()
    proc = run_main(args)
    assert proc.returncode == 0, tail(proc)
    assert "[eval] 20/20 images (100%)" in proc.stderr
    whole = json.load(open(trained / "eval.json"))
    with np.load(trained / "samples" / "samples.npz") as z:
        whole_images, labels = z["images"], z["labels"]
    assert whole_images.dtype == np.uint8 and whole_images.shape == (20, 32, 32, 1)
    np.testing.assert_array_equal(labels, np.tile(np.arange(10), 2))  # interleaved: class-balanced shards / splits
    assert whole["shards"] == 5 and whole["resumed_images"] == 0 and whole["num_samples"] == 20
    assert 0.0 <= whole["class_consistency"] <= 1.0 and 0.0 <= whole["precision"] <= 1.0
    assert whole["digit_fd"] > whole["real_vs_real_fd"] >= 0.0 and whole["digit_is"] >= 1.0

    clean()
    killed = subprocess.Popen(main_cmd(args), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None:
        if list((trained / "eval").glob("*/shard_00000.npz")):
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert killed.wait(60) == -signal.SIGKILL, "the eval finished before it could be killed"
    assert not (trained / "eval.json").exists()
    finished = len(list((trained / "eval").glob("*/shard_*.npz")))
    assert 1 <= finished < 5

    proc = run_main(args)
    assert proc.returncode == 0, tail(proc)
    resumed = json.load(open(trained / "eval.json"))
    assert resumed["resumed_images"] == 4 * finished
    for key in ("digit_fd", "digit_is", "precision", "recall", "class_consistency"):
        assert resumed[key] == whole[key], key
    with np.load(trained / "samples" / "samples.npz") as z:
        np.testing.assert_array_equal(z["images"], whole_images)


def test_eval_on_8_devices(trained, tmp_path):
    """The same eval on 8 simulated devices: sampling split over the mesh (the digit classifier runs locally)."""
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(trained, work, ignore=shutil.ignore_patterns("eval", "eval.json"))
    proc = run_main([CONFIG, f"--workdir={work}", "--mode=eval", "--config.sample.batch_size=8",
                     "--config.eval.shard_size=8", "--config.eval.feature_batch=8"], devices=8)
    assert proc.returncode == 0, tail(proc)
    result = json.load(open(work / "eval.json"))
    assert result["mesh"]["devices"] == 8 and result["shards"] == 3 and result["num_samples"] == 20
    assert 0.0 <= result["class_consistency"] <= 1.0 and result["digit_fd"] > 0


@pytest.mark.multiprocess
def test_eval_with_two_processes(trained, tmp_path):
    """jax.distributed on localhost: both processes sample and featurise each shard together, process 0 writes."""
    import shutil
    import subprocess
    import sys

    work = tmp_path / "copy"
    shutil.copytree(trained, work, ignore=shutil.ignore_patterns("eval", "eval.json"))
    cmd = [sys.executable, os.path.join(REPO, "launch", "local_multiprocess.py"), "--num_processes=2",
           "--devices_per_process=1", f"--log_dir={tmp_path}", "--", "-m", "jaxgen.main", CONFIG,
           f"--workdir={work}", "--mode=eval", "--config.sample.batch_size=4", "--config.eval.shard_size=8"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    logs = "".join(open(tmp_path / f"process_{i}.log").read()[-2000:] for i in range(2))
    assert proc.returncode == 0, logs
    result = json.load(open(work / "eval.json"))
    assert result["mesh"]["processes"] == 2 and result["mesh"]["devices"] == 2 and result["shards"] == 3
    assert len(list((work / "eval").glob("*/shard_*.npz"))) == 3
    with np.load(work / "samples" / "samples.npz") as z:
        assert z["images"].shape == (20, 32, 32, 1)


@pytest.mark.parity
def test_eval_with_inception_end_to_end(trained, tmp_path):
    """eval.metric=inception through the same runner: the parity fixture's Inception (rebuilt from its recipe), a
    --mode=reference file of the test digits; eval.json carries FID / IS / precision / recall, ADM-keyed samples; the
    policy search's 'fid' metric."""
    import shutil

    from jaxgen import config as config_lib
    from jaxgen import pipeline
    from tests.parity.fixtures import fixtures_of
    from tests.parity.test_inception import rebuild_weights

    fx = fixtures_of("inception")
    assert fx, "no inception parity fixture"
    weights = tmp_path / "inception.npz"
    np.savez(weights, **rebuild_weights(fx[0].meta))
    work = tmp_path / "copy"
    shutil.copytree(trained, work, ignore=shutil.ignore_patterns("eval", "eval.json"))
    config = config_lib.load("configs/mar_tiny.py:runlocal", {
        "eval.metric": "inception", "eval.inception_weights": str(weights), "eval.reference_split": "test",
        "eval.reference_limit": 16, "eval.feature_batch": 10, "eval.samples_npz": "adm", "eval.shard_size": 10,
        "sample.batch_size": 10, "eval.fid_method": "eigh"})
    ref = pipeline.reference(config, str(tmp_path / "ref"))
    assert ref["num_examples"] == 16
    with config.unlocked():
        config.eval.reference = ref["path"]
    result = pipeline.evaluate(config, str(work))
    assert result["metric"] == "inception" and result["num_samples"] == 20 and result["shards"] == 2
    assert result["fid"] > 0 and result["inception_score"] >= 1.0
    assert 0.0 <= result["precision"] <= 1.0 and 0.0 <= result["recall"] <= 1.0
    assert json.load(open(work / "eval.json"))["fid"] == result["fid"]
    with np.load(work / "samples" / "samples.npz") as z:
        assert z["arr_0"].shape == (20, 32, 32, 1) and z["arr_1"].shape == (20,)

    # the policy search's 'fid': the same extractor and reference; ~0 for the reference images themselves
    from jaxgen.data.digits import load_digits
    from jaxgen.search import metrics

    fid = metrics.build("fid", config)
    images, labels = load_digits("test")
    assert abs(fid(images[:16], labels[:16])) < 1e-3
    assert fid(np.random.default_rng(0).integers(0, 255, (16, 32, 32, 1), dtype=np.uint8), labels[:16]) > 1.0
