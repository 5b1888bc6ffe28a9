"""Logical axis names -> NamedShardings; sharded init; host-local batches -> global arrays."""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def rules_tuple(rules) -> Tuple[Tuple[str, Any], ...]:
    return tuple((str(name), (tuple(ax) if isinstance(ax, (list, tuple)) else ax)) for name, ax in rules)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> Tuple[P, list]:
    """Drop mesh axes from dims they do not divide (tiny configs on big meshes stay correct, just replicated).
    Returns (spec, [(dim index, dim size, mesh axes, axes size)] of each dropped axis) so the caller can say so."""
    out, dropped = [], []
    for i, (dim, ax) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        if ax is None:
            out.append(None)
            continue
        names = ax if isinstance(ax, tuple) else (ax,)
        size = int(np.prod([mesh.shape[a] for a in names]))
        if dim % size == 0:
            out.append(ax)
        else:
            out.append(None)
            dropped.append((i, dim, ax, size))
    return P(*out), dropped


def unbox(tree: Any) -> Any:
    """Strip logical-partitioning boxes WITHOUT adding sharding constraints (safe on abstract values)."""
    return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                                  is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def logical_to_shardings(abstract_boxed: Any, mesh: Mesh, rules, log_replicated: bool = True) -> Any:
    """Shardings for a boxed (nn.Partitioned) abstract pytree; unboxed leaves are replicated. Each array whose dim a
    mesh axis does not divide is replicated along that dim, and (log_replicated) said once in the log."""
    specs = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(specs, rules_tuple(rules))
    unboxed = unbox(abstract_boxed)
    notes = []

    def fit(path, spec, leaf):
        fitted, dropped = _fit_spec(spec, leaf.shape, mesh)
        for i, dim, ax, size in dropped:
            notes.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}: dim {i} ({dim}) is not divisible by "
                         f"mesh axis {ax} ({size}), replicated along it")
        return NamedSharding(mesh, fitted)

    shardings = jax.tree_util.tree_map_with_path(fit, mesh_specs, unboxed, is_leaf=lambda x: isinstance(x, P))
    if log_replicated:
        for note in notes:
            logging.warning("sharding: %s", note)
    return shardings


def sharded_init(init_fn: Callable[[], Any], mesh: Mesh, rules) -> Tuple[Any, Any]:
    """Run `init_fn` (returns boxed params/state) so every leaf is created directly in its final sharding.

    eval_shape -> shardings -> jit(out_shardings): nothing is ever materialised whole on one device.
    Returns (unboxed values, shardings).
    """
    with nn.logical_axis_rules(rules_tuple(rules)):
        abstract = jax.eval_shape(init_fn)
        shardings = logical_to_shardings(abstract, mesh, rules)
        values = jax.jit(lambda: nn.meta.unbox(init_fn()), out_shardings=shardings)()
    return values, shardings


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    axes = dict(rules_tuple(rules)).get("batch")
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def global_batch(local_batch: dict, mesh: Mesh, rules) -> dict:
    """Assemble the global batch from each process's local rows (leading axis split over 'batch')."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), np.asarray(v))
            for k, v in local_batch.items()}


def sharding_table(params: Any, shardings: Any) -> str:
    """One line per parameter array: path, shape, PartitionSpec."""
    rows = [f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} -> {sh.spec}"
            for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(shardings))]
    return "\n".join(rows)


def log_param_shardings(params: Any, shardings: Any, table_path: str = "") -> None:
    """At the start of a run: how many parameter arrays are sharded (one line); the sharded ones at DEBUG, the full
    table in `table_path` (see `sharding_table`)."""
    leaves = list(zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(shardings)))
    rows = [f"  {jax.tree_util.keystr(path)} {tuple(leaf.shape)} -> {sh.spec}" for (path, leaf), sh in leaves
            if any(s is not None for s in sh.spec)]
    logging.info("sharding: %d of %d parameter arrays sharded over mesh %s%s", len(rows), len(leaves),
                 dict(next(iter(leaves))[1].mesh.shape) if leaves else {},
                 f" (table: {table_path})" if table_path else "")
    if rows:
        logging.debug("sharded parameter arrays:\n%s", "\n".join(rows))
