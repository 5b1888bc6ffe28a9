"""Abstract params / train state of a config, built once, and the ONE ordered way to load a run's weights.

    params, source = restore.load_params(config, workdir, family, mesh, prefer_ema=True)

looks, in order, for (1) the run's latest checkpoint in <workdir>/checkpoints (the full train state, EMA preferred),
(2) a params export: <workdir>/export, or <workdir> itself when it is one (converted official weights), (3) the params
checkpoint named by config.init_from. The trainer (init_from when no checkpoint exists; resume targets), sampling,
evaluation, the tokenizer stage, the converter CLI and the notebook all go through this module.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax

from jaxgen.errors import CheckpointError
from jaxgen.parallel import sharding as sh
from jaxgen.train import checkpoint as ckpt_lib
from jaxgen.train import export, optim
from jaxgen.train import state as state_lib


def abstract_of(init_fn) -> Any:
    """Unboxed ShapeDtypeStructs of what `init_fn()` returns (no allocation): the shape check of the converters."""
    return sh.unbox(jax.eval_shape(init_fn))


def boxed_abstract_params(family) -> Any:
    """ShapeDtypeStructs of the family's params with their logical-axis boxes (no allocation)."""
    return jax.eval_shape(family.init, jax.random.PRNGKey(0))


def abstract_params(family, mesh=None, rules=None) -> Any:
    """Unboxed ShapeDtypeStructs of the params; with a mesh, each carries its NamedSharding (a restore target)."""
    if mesh is None:
        return abstract_of(lambda: family.init(jax.random.PRNGKey(0)))
    rules = sh.rules_tuple(rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = boxed_abstract_params(family)
        shardings = sh.logical_to_shardings(boxed, mesh, rules)
    return _with_shardings(sh.unbox(boxed), shardings)


def make_optimizer(config, family):
    """(lr schedule, optax transformation) of a run; the weight-decay mask comes from the abstract params."""
    schedule = optim.make_schedule(config.optim, config.total_steps, config.batch_size)
    tx = optim.make_optimizer(config.optim, schedule, family.weight_decay_mask(abstract_params(family)))
    return schedule, tx


def _init_state_fn(config, family, tx):
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))

    def init_fn():
        return state_lib.create(family.init(init_rng), ema=config.optim.ema_decay > 0, tx=tx, seed_key=state_rng)

    return init_fn


def init_train_state(config, family, mesh, rules, tx) -> Tuple[Any, Any]:
    """A fresh train state created directly in its shardings -> (state, shardings)."""
    return sh.sharded_init(_init_state_fn(config, family, tx), mesh, rules)


def abstract_train_state(config, family, mesh, rules, tx) -> Any:
    """ShapeDtypeStructs (with shardings) of the train state: the target a run checkpoint restores into."""
    rules = sh.rules_tuple(rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(_init_state_fn(config, family, tx))
        shardings = sh.logical_to_shardings(boxed, mesh, rules, log_replicated=False)
    return _with_shardings(sh.unbox(boxed), shardings)


def _with_shardings(tree, shardings):
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def replicate(tree: Any, mesh) -> Any:
    """Frozen arrays (e.g. a generator's tokenizer params) replicated on the mesh."""
    rep = sh.replicated(mesh)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, rep), tree)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _latest_checkpoint(workdir: str) -> Optional[int]:
    if not os.path.isdir(checkpoint_dir(workdir)):
        return None
    checkpointer = ckpt_lib.Checkpointer(checkpoint_dir(workdir), read_only=True)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def export_dir(workdir: str) -> Optional[str]:
    """The params export of `workdir`: the directory itself (converted weights) or its export/ subfolder."""
    workdir = os.path.abspath(workdir)
    for candidate in (workdir, os.path.join(workdir, "export")):
        if export.is_params_dir(candidate):
            return candidate
    return None


def find_source(config, workdir: str) -> Tuple[str, str]:
    """(kind, path) of the weights `load_params` would read: 'checkpoint', 'export' or 'init_from'."""
    if _latest_checkpoint(workdir) is not None:
        return "checkpoint", checkpoint_dir(workdir)
    exported = export_dir(workdir)
    if exported:
        return "export", exported
    init_from = config.get("init_from", "")
    if init_from:
        return "init_from", os.path.abspath(init_from)
    raise CheckpointError(f"no weights in {workdir}: no checkpoint in checkpoints/, no params export; train first "
                          f"(--mode=train), or pass converted weights as --workdir or --config.init_from")


def load_params(config, workdir: str, family, mesh, prefer_ema: bool = True) -> Tuple[Any, str]:
    """The params of a run (see the module docstring for the order), sharded for `mesh` -> (params, where)."""
    rules = sh.rules_tuple(config.mesh.rules)
    kind, path = find_source(config, workdir)
    if kind == "checkpoint":
        _, tx = make_optimizer(config, family)
        target = abstract_train_state(config, family, mesh, rules, tx)
        checkpointer = ckpt_lib.Checkpointer(path, read_only=True)
        try:
            step = checkpointer.latest_step()
            state = checkpointer.restore(step, target)["state"]
        finally:
            checkpointer.close()
        use_ema = prefer_ema and state.ema_params is not None
        params = state.ema_params if use_ema else state.params
        where = f"{path} step {step}{' (EMA)' if use_ema else ''}"
    else:
        params = export.load_params(path, abstract_params(family, mesh, rules), prefer_ema=prefer_ema)
        where = path
    logging.info("loaded %s params from %s", family.name, where)
    return params, where


def init_params_from(path: str, family, mesh, rules) -> Any:
    """Params of a params checkpoint (converted weights, another run's export) for starting a run (config.init_from);
    the raw params, not the EMA."""
    return export.load_params(path, abstract_params(family, mesh, rules), prefer_ema=False)
