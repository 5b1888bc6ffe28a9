"""The spine through its command line: device-count invariance, multi-process, exact resume after kill -9,
SIGTERM save, and one-line errors for bad input."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.cli_utils import REPO, TINY_VAE, assert_one_line_error, env, losses, main_cmd, run_main, tail


def _train(workdir, steps, devices=1, extra=(), with_log=False, **env_extra):
    proc = run_main([*TINY_VAE, f"--workdir={workdir}", f"--config.total_steps={steps}",
                     f"--config.checkpoint_every={steps}", *extra], devices=devices, **env_extra)
    assert proc.returncode == 0, tail(proc)
    return (losses(str(workdir)), proc.stderr) if with_log else losses(str(workdir))


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """The 1-device, 1-process reference run (10 steps, a checkpoint at 10): the device-count and process-count
    tests compare against its losses, the damaged-checkpoint test starts from a copy of its workdir."""
    workdir = tmp_path_factory.mktemp("one")
    return workdir, _train(workdir, 10)


@pytest.fixture
def one_device_losses(one_device_run):
    return one_device_run[1]


def test_eight_devices_match_one(tmp_path, one_device_losses):
    one = one_device_losses
    # Pure data parallel over 8 simulated devices, and a 2 x 4 (data x fsdp) mesh with sharded params/optimizer.
    eight = _train(tmp_path / "eight", 10, devices=8)
    fsdp, log = _train(tmp_path / "fsdp", 10, devices=8, extra=["--config.mesh.shape=(2,4,1)"], with_log=True)
    # The sharding table opens the run, and each array a mesh axis does not divide is named once with its shape.
    assert "parameter arrays sharded over mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in log
    table = open(tmp_path / "fsdp" / "sharding.txt").read()
    assert "['encoder']['conv_in']['kernel'] (3, 3, 1, 8) -> P(None, None, None, 'fsdp')" in table
    replicated = [line for line in log.splitlines() if "is not divisible by mesh axis fsdp (4)" in line]
    assert replicated and any("['decoder']['conv_out']['kernel'] (3, 3, 8, 1)" in line for line in replicated)
    assert len(replicated) == len(set(replicated))
    assert sorted(one) == sorted(eight) == sorted(fsdp) == [5, 10]
    for step in one:
        # Only the order of float32 reductions differs across devices: relative 1e-4 after 10 Adam steps.
        np.testing.assert_allclose(eight[step], one[step], rtol=1e-4)
        np.testing.assert_allclose(fsdp[step], one[step], rtol=1e-4)


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path, one_device_losses):
    one = one_device_losses
    workdir = tmp_path / "two"
    launcher = os.path.join(REPO, "launch", "local_multiprocess.py")
    cmd = [sys.executable, launcher, "--num_processes=2", "--devices_per_process=1", f"--log_dir={tmp_path}", "--",
           "-m", "jaxgen.main", *TINY_VAE, f"--workdir={workdir}", "--config.total_steps=10",
           "--config.checkpoint_every=10"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    logs = "".join(open(tmp_path / f"process_{i}.log").read()[-2000:] for i in range(2))
    assert proc.returncode == 0, logs
    two = losses(str(workdir))
    assert sorted(two) == sorted(one)
    for step in one:
        np.testing.assert_allclose(two[step], one[step], rtol=1e-4)
    assert os.path.isdir(workdir / "checkpoints" / "10")


def test_exact_resume_after_kill9(tmp_path):
    args = [*TINY_VAE, "--config.total_steps=40", "--config.checkpoint_every=10", "--config.checkpoint.keep=10"]
    straight = tmp_path / "straight"
    proc = run_main([*args, f"--workdir={straight}"])
    assert proc.returncode == 0, tail(proc)

    killed = tmp_path / "killed"
    p = subprocess.Popen(main_cmd([*args, f"--workdir={killed}"], step_seconds=0.15), cwd=REPO, env=env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt20 = killed / "checkpoints" / "20"
    deadline = time.time() + 300
    while not ckpt20.is_dir() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert ckpt20.is_dir(), "step-20 checkpoint never appeared"
    p.send_signal(signal.SIGKILL)  # kill -9: no handler runs, a later async save may be cut off mid-write
    p.wait()
    assert p.returncode == -signal.SIGKILL

    proc = run_main([*args, f"--workdir={killed}"])
    assert proc.returncode == 0, tail(proc)
    a, b = losses(str(straight)), losses(str(killed))
    assert sorted(a) == sorted(b) == list(range(5, 41, 5))
    for step in a:
        assert a[step] == b[step], f"step {step}: {a[step]!r} straight vs {b[step]!r} resumed (must be bit-identical)"


def test_sigterm_saves_and_exits_zero(tmp_path):
    workdir = tmp_path / "w"
    args = [*TINY_VAE, "--config.total_steps=100000", "--config.checkpoint_every=100000", f"--workdir={workdir}"]
    p = subprocess.Popen(main_cmd(args, step_seconds=0.05), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert p.poll() is None, p.communicate()[1][-2000:]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    steps = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
    assert steps and 5 <= max(steps) < 100000


# --------------------------------------------------------------------------------------------- bad input

def _assert_one_line_error(proc, *needles):
    return assert_one_line_error(proc, *needles)


def test_unknown_config_key(tmp_path):
    proc = run_main([*TINY_VAE, f"--workdir={tmp_path}", "--config.optim.learning_rat=1e-3"])
    _assert_one_line_error(proc, "learning_rat")


def test_batch_not_divisible_by_data_parallel(tmp_path):
    proc = run_main([*TINY_VAE, f"--workdir={tmp_path}", "--config.batch_size=12"], devices=8)
    _assert_one_line_error(proc, "batch_size 12", "multiple of 8")


def test_missing_dataset_directory(tmp_path):
    proc = run_main([*TINY_VAE, f"--workdir={tmp_path / 'w'}", "--config.data.source=imagefolder",
                     f"--config.data.data_dir={tmp_path / 'nope'}"])
    _assert_one_line_error(proc, "nope")


def test_unknown_family(tmp_path):
    proc = run_main([*TINY_VAE, f"--workdir={tmp_path}", "--config.family=gan"])
    _assert_one_line_error(proc, "gan", "config.family")


def test_sampling_a_tokenizer_config(tmp_path):
    proc = run_main([*TINY_VAE, f"--workdir={tmp_path}", "--mode=sample"])
    _assert_one_line_error(proc, "no class-conditional sampler", "configs/mar_tiny.py")


def _tree_digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(path.encode())
            h.update(open(path, "rb").read())
    return h.hexdigest()


def test_unreadable_checkpoint_is_reported_and_kept(tmp_path, one_device_run):
    workdir = tmp_path / "w"
    shutil.copytree(one_device_run[0], workdir)
    ckpt = workdir / "checkpoints" / "10" / "state"
    # Corrupt every data file of the saved state (simulates a damaged disk / wrong file).
    for dirpath, _, files in os.walk(ckpt):
        for name in files:
            if not name.endswith(".json") and "manifest" not in name and name != "_METADATA":
                with open(os.path.join(dirpath, name), "wb") as f:
                    f.write(b"garbage")
            elif name == "_METADATA":
                with open(os.path.join(dirpath, name), "w") as f:
                    f.write("{not json")
    before = _tree_digest(workdir / "checkpoints")
    proc = run_main([*TINY_VAE, f"--workdir={workdir}", "--config.total_steps=20", "--config.checkpoint_every=10"])
    _assert_one_line_error(proc, "checkpoint")
    assert _tree_digest(workdir / "checkpoints") == before
