"""The trainer halts on a non-finite loss, naming the first bad step and the last good checkpoint (issue 2, item 5).

A one-parameter family: Adam with a constant lr of 1 moves p by ~1 per step (loss -p), and the loss turns NaN once
p passes `threshold`, so the first bad step is known in advance. In-process: one tiny compile per case.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import base_config
from jaxgen.data.pipeline import make_train_iterator
from jaxgen.families.base import Family
from jaxgen.nn.layers import with_axes
from jaxgen.train.trainer import NonFiniteError, Trainer


class _Counter(nn.Module):
    @nn.compact
    def __call__(self):
        return self.param("p", with_axes(nn.initializers.zeros, ("norm",)), (1,), jnp.float32)


class _NanAfter(Family):
    """loss = -p (+ NaN once p > threshold); p counts the updates applied so far."""

    name = "nan_toy"

    def __init__(self, config, threshold: float):
        super().__init__(config)
        self.threshold = threshold

    def init(self, rng):
        return _Counter().init(rng)["params"]

    def loss(self, params, batch, rng, frozen):
        p = _Counter().apply({"params": params})[0]
        data = 0.0 * jnp.mean(batch["image"])  # the batch flows through the step like a real family's
        loss = -p + data + jnp.where(p > self.threshold, jnp.nan, 0.0)
        return loss, {"p": p}

    def dummy_batch(self, batch_size):
        return {"image": jax.ShapeDtypeStruct((batch_size, 32, 32, 1), jnp.float32),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}


def _config():
    c = base_config()
    c.family = "nan_toy"
    c.batch_size = 4
    c.total_steps = 20
    c.log_every = 5
    c.checkpoint_every = 4
    c.optim.lr = 1.0
    c.optim.b1 = 0.0  # Adam update = lr * g / |g|: exactly 1 per step
    c.checkpoint.async_save = False
    return c


@pytest.mark.parametrize("threshold, bad_step, last_good", [(4.5, 6, 4), (-0.5, 1, None)])
def test_trainer_halts_on_nan_naming_step_and_checkpoint(tmp_path, threshold, bad_step, last_good):
    config = _config()
    workdir = str(tmp_path / "run")
    trainer = Trainer(config, workdir, family=_NanAfter(config, threshold))
    data = make_train_iterator(config.data, ("image", "label"), config.batch_size, config.seed,
                               process_index=0, process_count=1)
    try:
        with pytest.raises(NonFiniteError) as err:
            trainer.run(data)
        msg = str(err.value)
        ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
        assert f"NaN/Inf at step {bad_step} " in msg, msg
        if last_good is None:
            assert "no checkpoint was written yet" in msg, msg
            assert trainer.checkpointer.latest_step() is None
        else:
            assert f"last good checkpoint: step {last_good} in {ckpt_dir}" in msg, msg
            # Detected at the step-8 checkpoint (steps 7 and 8 ran): no bad checkpoint was written.
            assert trainer.checkpointer.all_steps() == [last_good]
        assert "\n" not in msg and "optim.lr" in msg  # one line, with what to do about it
        # The state stayed the last good one: updates stopped at the first bad step.
        state = jax.device_get(trainer.state)
        assert int(state.nonfinite_step) == bad_step
        np.testing.assert_allclose(np.asarray(state.params["p"]), [bad_step - 1], rtol=1e-6)
        assert np.all(np.isfinite(np.asarray(state.params["p"])))
        logged = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
        assert all(s < bad_step for s in logged), logged  # no metrics were logged past the bad step
    finally:
        trainer.close()


def test_the_step_compiles_for_the_abstract_state_and_a_resume_builds_no_fresh_one(tmp_path, monkeypatch):
    """Trainer compiles the step ahead of time for the abstract state and creates the state on first use; resuming
    restores into the abstract state without building a fresh one first."""
    from jaxgen.train import restore

    config = _config()
    config.total_steps = 4
    workdir = str(tmp_path / "run")

    def data():
        return make_train_iterator(config.data, ("image", "label"), config.batch_size, config.seed,
                                   process_index=0, process_count=1)

    trainer = Trainer(config, workdir, family=_NanAfter(config, threshold=100.0))
    try:
        compiled = trainer.compiled_step()
        assert trainer._state is None and trainer.compiled_step() is compiled  # compiled once, no state yet
        assert trainer.run(data()).step == 4
    finally:
        trainer.close()

    def no_fresh_state(*args, **kwargs):
        raise AssertionError("a resumed run built a fresh train state")

    monkeypatch.setattr(restore, "init_train_state", no_fresh_state)
    config.total_steps = 6
    trainer = Trainer(config, workdir, family=_NanAfter(config, threshold=100.0))
    try:
        result = trainer.run(data())
        assert result.step == 6
        np.testing.assert_allclose(np.asarray(jax.device_get(result.state.params["p"])), [6.0], rtol=1e-6)
    finally:
        trainer.close()
