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


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop mesh axes from dims they do not divide (tiny configs on big meshes stay correct, just replicated)."""
    out = []
    for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if ax is None:
            out.append(None)
            continue
        names = ax if isinstance(ax, tuple) else (ax,)
        size = int(np.prod([mesh.shape[a] for a in names]))
        out.append(ax if dim % size == 0 else None)
    return P(*out)


def unbox(tree: Any) -> Any:
    """Strip logical-partitioning boxes WITHOUT adding sharding constraints (safe on abstract values)."""
    return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                                  is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def logical_to_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
    """Shardings for a boxed (nn.Partitioned) abstract pytree; unboxed leaves are replicated."""
    specs = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(specs, rules_tuple(rules))
    unboxed = unbox(abstract_boxed)
    return jax.tree_util.tree_map(
        lambda spec, leaf: NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh)),
        mesh_specs, unboxed, is_leaf=lambda x: isinstance(x, P))


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


def log_param_shardings(params: Any, shardings: Any, limit: int = 12) -> None:
    rows = []
    for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(shardings)):
        if any(s is not None for s in sh.spec):
            rows.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} -> {sh.spec}")
    logging.info("%d sharded parameter arrays%s", len(rows), (": " + "; ".join(rows[:limit])) if rows else "")
