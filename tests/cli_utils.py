"""Helpers for tests that run `python -m jaxgen.main` in subprocesses (fresh JAX runtimes, device counts, signals)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List

from tests.xla_test_flags import with_test_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The jaxgen cache (the digit metric's classifier) of the suite and of the CLI processes it starts (conftest.py).
TEST_CACHE = os.path.join(REPO, ".pytest_cache", "jaxgen")

# A few-second kl_vae run: the fastest real family (single stage, no tokenizer).
TINY_VAE = [
    "--config=configs/kl_vae_tiny.py",
    "--config.batch_size=16",
    "--config.model.ch_mult=(1,2)",
    "--config.optim.warmup_steps=2",
    "--config.log_every=5",
]


def env(devices: int = 1, **extra) -> Dict[str, str]:
    e = dict(os.environ)
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    flags = with_test_xla_flags("")  # the suite's compile flags (tests/xla_test_flags.py), not the caller's device count
    if devices > 1:
        flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    e["XLA_FLAGS"] = flags
    if not flags:
        e.pop("XLA_FLAGS")
    e["JAXGEN_CACHE"] = e.get("JAXGEN_CACHE", TEST_CACHE)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def main_cmd(args: List[str], step_seconds: float = 0.0) -> List[str]:
    """The jaxgen CLI; with step_seconds, every training step takes at least that long (tests/slow_main.py)."""
    if step_seconds:
        return [sys.executable, os.path.join(REPO, "tests", "slow_main.py"), str(step_seconds), *args]
    return [sys.executable, "-m", "jaxgen.main", *args]


def run_main(args: List[str], devices: int = 1, timeout: float = 600, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(main_cmd(args), cwd=REPO, env=env(devices, **extra), capture_output=True, text=True,
                          timeout=timeout)


def losses(workdir: str) -> Dict[int, float]:
    """step -> loss from metrics.jsonl (the last record wins when a resumed run re-logs a step)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            out[int(row["step"])] = float(row["loss"])
    return out


def tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return (proc.stdout[-n:] if proc.stdout else "") + "\n--- stderr ---\n" + (proc.stderr[-n:] if proc.stderr else "")


def error_lines(stderr: str) -> List[str]:
    return [l for l in stderr.splitlines() if l.startswith("jaxgen: error:")]


def assert_one_line_error(proc, *needles) -> str:
    """Bad input: a non-zero exit and exactly one line on stderr, `jaxgen: error: ...`, and nothing else printed."""
    assert proc.returncode not in (0, None), tail(proc)
    printed = [l for l in (proc.stderr + (proc.stdout or "")).splitlines() if l.strip()]
    assert len(printed) == 1 and printed[0].startswith("jaxgen: error:"), tail(proc)
    for n in needles:
        assert n.lower() in printed[0].lower(), printed[0]
    return printed[0]
