"""The one jitted, donated train step (gradient accumulation and EMA inside; NaN guard without host sync)."""
from __future__ import annotations

from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import optax

from jaxgen.train.state import TrainState


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    ema_decay: float, grad_accum: int = 1) -> Callable:
    """loss_fn(params, batch, rng, frozen, step) -> (loss, metrics) (`Family.loss_at_step`; step is the traced index
    of the update). Returns step(state, batch, frozen) -> (state, metrics)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def compute_grads(params, batch, rng, frozen, step):
        if grad_accum == 1:
            (loss, metrics), grads = grad_fn(params, batch, rng, frozen, step)
            return loss, metrics, grads
        # Micro-batches along the leading axis: sum grads in f32 over a scan, then average (one optimizer update).
        micro = jax.tree_util.tree_map(lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)

        def body(carry, inputs):
            i, mb = inputs
            (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), frozen, step)
            acc = jax.tree_util.tree_map(jnp.add, carry, (loss, metrics, grads))
            return acc, None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, jax.tree_util.tree_map(
            lambda x: x[0], micro), rng, frozen, step)))
        init = (zeros[0][0], zeros[0][1], zeros[1])
        (loss, metrics, grads), _ = jax.lax.scan(body, init, (jnp.arange(grad_accum), micro))
        scale = 1.0 / grad_accum
        return loss * scale, jax.tree_util.tree_map(lambda m: m * scale, metrics), jax.tree_util.tree_map(lambda g: g * scale, grads)

    def apply_update(operands):
        params, opt_state, ema, grads = operands
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if ema is not None:
            ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, new_params)
        return new_params, new_opt, ema

    def skip_update(operands):
        params, opt_state, ema, _ = operands
        return params, opt_state, ema

    def step(state: TrainState, batch: Dict[str, jax.Array], frozen: Any):
        rng = jax.random.fold_in(state.rng, state.step)
        loss, metrics, grads = compute_grads(state.params, batch, rng, frozen, state.step)
        # One scalar test: the global norm is non-finite iff some gradient is (or so large its square overflows, which
        # is a failed run too). A per-leaf isfinite/all over the tree gave the same answer but made XLA's compile of
        # the step ~3x slower (a reduction per leaf, all feeding every parameter's select).
        grad_norm = optax.global_norm(grads)
        ok = jnp.logical_and(jnp.isfinite(loss), jnp.isfinite(grad_norm))
        ok = jnp.logical_and(ok, state.nonfinite_step < 0)
        # A bad step keeps the last good state. As a conditional, not a select of new vs old: the optimizer can then
        # update the donated params / moments in place instead of holding both copies (MAR-B: -1.x GB).
        params, opt_state, ema = jax.lax.cond(ok, apply_update, skip_update,
                                              (state.params, state.opt_state, state.ema_params, grads))
        nonfinite = jnp.where(jnp.logical_or(ok, state.nonfinite_step >= 0), state.nonfinite_step, state.step + 1)
        new_state = state.replace(step=state.step + 1, params=params,
                                  ema_params=ema, opt_state=opt_state, nonfinite_step=nonfinite)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = schedule(state.step)
        return new_state, metrics

    return step
