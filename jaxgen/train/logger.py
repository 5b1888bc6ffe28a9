"""Host-0 logging: console progress with ETA, metrics.jsonl, TensorBoard scalars and image grids."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Dict

import jax
import numpy as np


def is_host0() -> bool:
    return jax.process_index() == 0


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def show_progress(line: str) -> None:
    """Progress: rewrites one line in place on a terminal; a log line each time otherwise (files, CI, pipes)."""
    if not is_host0():
        return
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + line)
        sys.stderr.flush()
    else:
        logging.info("%s", line)


def end_progress() -> None:
    if is_host0() and sys.stderr.isatty():
        sys.stderr.write("\n")
        sys.stderr.flush()


class Progress:
    """Items done of a total, with rate and ETA (`show_progress`), for sampling and caching."""

    def __init__(self, what: str, total: int, unit: str = "images", done_before: int = 0):
        """`done_before`: items already done when this run started (a resumed job): not counted in the rate."""
        self.what, self.total, self.unit = what, int(total), unit
        self.done_before = int(done_before)
        self.t0 = time.time()

    def update(self, done: int) -> None:
        elapsed = max(time.time() - self.t0, 1e-9)
        rate = (done - self.done_before) / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        show_progress(f"[{self.what}] {done}/{self.total} {self.unit} ({100.0 * done / max(self.total, 1):.0f}%) | "
                      f"{rate:.2f} {self.unit}/s | ETA {_fmt_eta(eta) if np.isfinite(eta) else '?'}")
        if done >= self.total:
            end_progress()


class RunLogger:
    """Writes nothing on processes other than 0. `scalars` also prints a progress line."""

    def __init__(self, workdir: str, total_steps: int, name: str = "train"):
        self.total_steps = total_steps
        self.name = name
        self.enabled = is_host0()
        self._tb = None
        self._t0 = None
        self._s0 = None
        self._last_t = None
        self._last_s = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)
            except Exception as e:  # noqa: BLE001 - TensorBoard is a convenience, never a reason to stop training
                logging.warning("TensorBoard disabled: %s", e)

    def start(self, step: int):
        self._t0 = self._last_t = time.time()
        self._s0 = self._last_s = step

    def scalars(self, step: int, metrics: Dict[str, float]):
        now = time.time()
        rate = (step - self._last_s) / max(now - self._last_t, 1e-9) if self._last_t else 0.0
        overall = (step - self._s0) / max(now - self._t0, 1e-9) if self._t0 else 0.0
        self._last_t, self._last_s = now, step
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}, "steps_per_sec": rate}
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(f"{self.name}/{k}", v, step)
        eta = (self.total_steps - step) / overall if overall > 0 else float("nan")
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("loss", "lr", "grad_norm", "mask_ratio"))
        show_progress(f"[{self.name}] step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.0f}%) "
                      f"{shown} | {rate:.2f} steps/s | ETA {_fmt_eta(eta) if np.isfinite(eta) else '?'}")

    def image(self, tag: str, step: int, grid_uint8: np.ndarray):
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, grid_uint8, step, dataformats="HWC")

    def text(self, tag: str, text: str):
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, 0)

    def close(self):
        end_progress()
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def parameter_overview(params) -> str:
    try:
        from clu import parameter_overview as po
        return po.get_parameter_overview(params, include_stats=False)
    except Exception:  # noqa: BLE001
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
        return f"{n:,} parameters"


def count_params(params) -> int:
    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)))
