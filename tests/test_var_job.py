"""VAR's pipeline end to end through the command line on a few steps (`configs/var_tiny.py:runlocal`): the multi-scale
VQ tokenizer stage, then VAR on its token pyramid, then --mode=sample."""
from __future__ import annotations

import json
import os

import numpy as np

from tests.cli_utils import run_main, tail


def test_var_tiny_trains_both_stages_and_samples(tmp_path):
    config = "--config=configs/var_tiny.py:runlocal"
    proc = run_main([config, f"--workdir={tmp_path}"])
    assert proc.returncode == 0, tail(proc)
    # stage 1: the tokenizer run, its code-usage metrics logged, exported for stage 2
    assert os.path.isdir(tmp_path / "tokenizer" / "checkpoints" / "20")
    assert os.path.isdir(tmp_path / "tokenizer" / "export")
    tok_rows = [json.loads(line) for line in open(tmp_path / "tokenizer" / "metrics.jsonl")]
    assert [r["step"] for r in tok_rows] == [5, 10, 15, 20]
    assert all(0.0 < r["code_usage"] <= 1.0 for r in tok_rows)
    # stage 2: VAR's cross-entropy over 256 codes starts near uniform (ln 256 = 5.55) and stays finite
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(np.isfinite(r["loss"]) and 0.0 < r["loss"] < 8.0 for r in rows)
    assert os.path.isdir(tmp_path / "checkpoints" / "20") and os.path.isdir(tmp_path / "export")
    assert json.load(open(tmp_path / "config.json"))["tokenizer"]["config"]["family"] == "msvq"

    proc = run_main([config, f"--workdir={tmp_path}", "--mode=sample", "--config.sample.num_per_class=1"])
    assert proc.returncode == 0, tail(proc)
    with np.load(tmp_path / "samples" / "samples.npz") as z:
        images, labels = z["images"], z["labels"]
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 1)
    np.testing.assert_array_equal(labels, np.arange(10))
    assert images.std() > 0  # not a blank canvas
    assert os.path.isfile(tmp_path / "samples" / "grid.png")
