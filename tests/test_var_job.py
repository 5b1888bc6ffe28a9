"""VAR's pipeline end to end through the command line on a few steps (`configs/var_tiny.py:runlocal`): the multi-scale
VQ tokenizer stage, then VAR on its token pyramid with a sample grid from the trained model. (`--mode=sample` itself
is family-agnostic and covered by tests/test_main_job.py; the VAR sampler by tests/test_var_family.py.)"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from tests.cli_utils import run_main, tail


def test_var_tiny_trains_both_stages_and_samples(tmp_path):
    proc = run_main(["--config=configs/var_tiny.py:runlocal", f"--workdir={tmp_path}", "--config.sample_every=20"])
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
    # the periodic sample grid: the KV-cached sampler through the tokenizer's decoder
    grid = np.asarray(Image.open(tmp_path / "samples" / "train_grid_00000020.png"))
    assert grid.ndim >= 2 and grid.std() > 0  # not a blank canvas
