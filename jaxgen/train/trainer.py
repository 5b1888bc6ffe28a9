"""The family-agnostic training loop.

One jitted, donated step compiled once (ahead of time, for the abstract state and batch); params and optimizer
state created sharded; async atomic checkpoints with the data-iterator state; exact auto-resume; SIGTERM -> save
and exit 0; non-finite loss -> halt naming the step and the last good checkpoint. Callbacks
(`on_step(trainer, step)`) run after each step on the host.
"""
from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import families
from jaxgen.errors import ConfigError, UserError
from jaxgen.parallel import mesh as mesh_lib
from jaxgen.parallel import sharding as sh
from jaxgen.train import checkpoint as ckpt_lib
from jaxgen.train import restore
from jaxgen.train.logger import RunLogger, count_params, parameter_overview
from jaxgen.train.step import make_train_step


class NonFiniteError(UserError):
    pass


@dataclass
class TrainResult:
    state: Any
    step: int
    stopped_by_signal: bool = False


class _SignalFlag:
    """SIGTERM (preemption) sets a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self):
        self.raised = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler, no flag
            self._old = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint at the next step boundary, then exiting")
        self.raised = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def validate_batch(config, mesh, rules, where: str = "config") -> int:
    """The global batch splits over the data-parallel mesh axes, the processes and the accumulation steps.
    `where`: the config path of this stage in the run (config, or config.tokenizer.config for a tokenizer stage)."""
    dp = mesh_lib.data_parallel_size(mesh, rules)
    key = f"--{where}.batch_size"
    if config.batch_size % dp:
        raise ConfigError(f"{where}.batch_size {config.batch_size} is not divisible by the data-parallel size {dp} "
                          f"(mesh {dict(mesh.shape)}); set {key} to a multiple of {dp}")
    if config.batch_size % jax.process_count():
        raise ConfigError(f"{where}.batch_size {config.batch_size} is not divisible by the {jax.process_count()} "
                          f"processes; set {key} to a multiple of {jax.process_count()}")
    accum = int(config.optim.get("grad_accum", 1))
    if accum < 1 or config.batch_size % (accum * dp):
        raise ConfigError(f"{where}.batch_size {config.batch_size} must be divisible by {where}.optim.grad_accum x "
                          f"data-parallel size ({accum} x {dp}); change one of them")
    return dp


class Trainer:
    """Holds what a run needs; `run()` trains from scratch or resumes from the workdir."""

    def __init__(self, config, workdir: str, family=None, mesh=None, frozen: Any = None, stage: str = ""):
        """`frozen`: arrays the family needs but does not train (a generator's {'tokenizer': params}), replicated."""
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.stage = stage  # e.g. "stage 1/2 (tokenizer)", shown in the header
        self.family = family or families.build(config)
        self.mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
        self.rules = sh.rules_tuple(config.mesh.rules)
        validate_batch(config, self.mesh, self.rules)
        self.frozen = restore.replicate(frozen if frozen is not None else {}, self.mesh)
        self.schedule, self.tx = restore.make_optimizer(config, self.family)
        # The state is created on first use, and never when a run resumes: the checkpoint is restored into the
        # abstract state instead of over a fresh one.
        self.abstract_state = restore.abstract_train_state(config, self.family, self.mesh, self.rules, self.tx)
        self.state_shardings = jax.tree_util.tree_map(lambda a: a.sharding, self.abstract_state)
        self._state = None
        self._compiled_step = None
        self.checkpointer = ckpt_lib.Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                                  keep=config.checkpoint.keep, keep_every=config.checkpoint.keep_every,
                                                  async_save=config.checkpoint.async_save)

    def mesh_context(self):
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    @property
    def state(self):
        """The train state: restored by `run` when resuming, else a fresh one created on first use."""
        if self._state is None:
            with self.mesh_context():
                state, _ = restore.init_train_state(self.config, self.family, self.mesh, self.rules, self.tx)
            self._state = jax.block_until_ready(state)
        return self._state

    @state.setter
    def state(self, value):
        self._state = value

    def abstract_batch(self):
        """ShapeDtypeStructs (with shardings) of one global batch: what the step is compiled for."""
        return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh.batch_sharding(self.mesh, self.rules,
                                                                                         len(s.shape)))
                for k, s in self.family.dummy_batch(self.config.batch_size).items()}

    def compiled_step(self):
        """The train step compiled ahead of time for the abstract state and batch (once per Trainer)."""
        if self._compiled_step is None:
            step = make_train_step(self.family.loss_at_step, self.tx, self.schedule,
                                   float(self.config.optim.ema_decay), int(self.config.optim.get("grad_accum", 1)))
            batch = self.abstract_batch()
            frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.frozen)
            jitted = jax.jit(step, in_shardings=(self.state_shardings, {k: b.sharding for k, b in batch.items()},
                                                 frozen_shardings),
                             out_shardings=(self.state_shardings, sh.replicated(self.mesh)), donate_argnums=(0,))
            with self.mesh_context():
                self._compiled_step = jitted.lower(self.abstract_state, batch, self.frozen).compile()
        return self._compiled_step

    def maybe_init_from(self):
        """Start from a params checkpoint (converted official weights / another run) when config.init_from is set."""
        path = self.config.get("init_from", "")
        if not path:
            return
        params = restore.init_params_from(path, self.family, self.mesh, self.rules)
        ema = self.state.ema_params
        self.state = self.state.replace(params=params, ema_params=(jax.tree_util.tree_map(jnp.copy, params)
                                                                   if ema is not None else None))
        logging.info("initialised params from %s", path)

    def run(self, data_iter, on_sample=None, callbacks: Sequence[Any] = ()) -> TrainResult:
        config = self.config
        start = self.checkpointer.latest_step()
        if start is not None:
            restored = self.checkpointer.restore(start, self.abstract_state, data_iter)
            self.state = restored["state"]
            logging.info("resumed from %s at step %d", self.checkpointer.directory, start)
        else:
            start = 0
            self.maybe_init_from()
            self.state  # noqa: B018 - creates the fresh state (unless init_from did), before compiling
        # compiled after the state's arrays are in place: compiling first left XLA's freed compile-time memory
        # between them, where with huge pages MAR-B's second step took 18 s and peaked 3 GB higher
        step_fn = self.compiled_step()
        logger = RunLogger(self.workdir, config.total_steps, name=config.family)
        if logger.enabled:
            self._write_header(logger, start)
        meta = {"family": config.family}
        pending = []
        last_good = self.checkpointer.latest_step()
        stopped = False
        logger.start(start)
        step = start
        try:
            with _SignalFlag() as sigterm, self.mesh_context():
                while step < config.total_steps:
                    local = next(data_iter)
                    batch = sh.global_batch(local, self.mesh, self.rules)
                    self.state, metrics = step_fn(self.state, batch, self.frozen)
                    pending.append(metrics)
                    step += 1
                    for callback in callbacks:
                        callback.on_step(self, step)
                    last = step == config.total_steps
                    if step % config.log_every == 0 or last:
                        self._check_finite(last_good)
                        host = jax.device_get(pending)
                        pending = []
                        logger.scalars(step, {k: float(np.mean([m[k] for m in host])) for k in host[0]})
                    if (config.checkpoint_every and step % config.checkpoint_every == 0) or last:
                        self._check_finite(last_good)
                        self.checkpointer.save(step, self.state, data_iter, meta, force=last)
                        last_good = step
                    if on_sample is not None and config.sample_every and step % config.sample_every == 0:
                        on_sample(self, step, logger)
                    if sigterm.raised or _preemption_reached(step):
                        self._check_finite(last_good)
                        if self.checkpointer.latest_step() != step:
                            self.checkpointer.save(step, self.state, data_iter, meta, force=True)
                        stopped = True
                        logging.warning("saved step %d after SIGTERM; exiting", step)
                        break
            self.checkpointer.wait()
        finally:
            logger.close()  # also when a NaN halt raises: metrics.jsonl and TensorBoard get flushed
        return TrainResult(self.state, step, stopped)

    def _write_header(self, logger, start: int) -> None:
        """One compact line on the console; the full parameter and sharding tables in the workdir and TensorBoard."""
        config = self.config
        params = self.abstract_state.params
        n = count_params(params)
        dp = mesh_lib.data_parallel_size(self.mesh, self.rules)
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        logging.info("%s%s: %s params | mesh %s (%d devices, %d processes) | batch %d (%d per device) | %s compute, "
                     "%s params | %s%s", f"[{self.stage}] " if self.stage else "", config.family, _human(n), mesh,
                     jax.device_count(), jax.process_count(), config.batch_size, config.batch_size // dp,
                     config.compute_dtype, config.param_dtype, self.workdir,
                     f" | resuming at step {start}" if start else "")
        tables = {"parameters": parameter_overview(params),
                  "sharding": sh.sharding_table(params, self.state_shardings.params)}
        for name, text in tables.items():
            with open(os.path.join(self.workdir, f"{name}.txt"), "w") as f:
                f.write(text + "\n")
            logger.text(name, "```\n" + text + "\n```")
        logger.text("config", "```\n" + str(config) + "\n```")
        sh.log_param_shardings(params, self.state_shardings.params,
                               os.path.join(self.workdir, "sharding.txt"))

    def _check_finite(self, last_good: Optional[int]):
        bad = int(jax.device_get(self.state.nonfinite_step))
        if bad >= 0:
            self.checkpointer.wait()
            where = (f"last good checkpoint: step {last_good} in {self.checkpointer.directory}" if last_good
                     else "no checkpoint was written yet")
            raise NonFiniteError(f"loss or gradients became NaN/Inf at step {bad} (no update was applied from then on); "
                                 f"{where}; lower optim.lr, enable optim.grad_clip, or use float32 compute")

    def close(self):
        self.checkpointer.close()


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _preemption_reached(step: int) -> bool:
    if jax.process_count() == 1:
        return False
    try:
        from jax.experimental import multihost_utils
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except Exception:  # noqa: BLE001 - preemption service not enabled
        return False
