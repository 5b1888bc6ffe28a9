"""Family-agnostic generation: class labels -> uint8 images, compiled once per batch shape, sharded over the batch."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxgen.parallel import sharding as sh
from jaxgen.utils.images import make_grid, save_png, to_uint8


def class_labels(num_classes: int, per_class: int) -> np.ndarray:
    """[0]*per_class + [1]*per_class + ...: class-major, so grids show one class per row block."""
    return np.repeat(np.arange(num_classes, dtype=np.int32), per_class)


def generate(family, params: Any, frozen: Any, labels: np.ndarray, seed: int, batch_size: int, mesh,
             rules) -> np.ndarray:
    """All `labels` through `family.sample` in fixed-size chunks (the last one padded); returns uint8 NHWC on host."""
    rules = sh.rules_tuple(rules)
    dp = max(1, sh_data_parallel(mesh, rules))
    batch_size = max(dp, (batch_size // dp) * dp)
    label_sharding = sh.batch_sharding(mesh, rules, 1)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fn = _jitted_sample(family, label_sharding)
        out = []
        t0 = time.time()
        for i in range(0, len(labels), batch_size):
            chunk = labels[i:i + batch_size]
            n = len(chunk)
            padded = np.concatenate([chunk, np.zeros(batch_size - n, np.int32)]) if n < batch_size else chunk
            glabels = jax.make_array_from_callback((batch_size,), label_sharding, lambda idx: padded[idx])
            images = fn(params, frozen, glabels, jax.random.fold_in(jax.random.PRNGKey(seed), i // batch_size))
            images = multihost_utils.process_allgather(images, tiled=True)
            out.append(to_uint8(np.asarray(images, np.float32))[:n])
        logging.info("sampled %d images in %.1fs (%.2f images/s, batch %d)", len(labels), time.time() - t0,
                     len(labels) / max(time.time() - t0, 1e-9), batch_size)
    return np.concatenate(out, axis=0)


def _jitted_sample(family, label_sharding):
    """One jitted sampler per (family, label sharding): periodic sampling during training compiles only once."""
    cache = family.__dict__.setdefault("_jitted_samplers", {})
    if label_sharding not in cache:
        cache[label_sharding] = jax.jit(family.sample, in_shardings=(None, None, label_sharding, None))
    return cache[label_sharding]


def sh_data_parallel(mesh, rules) -> int:
    from jaxgen.parallel.mesh import data_parallel_size

    return data_parallel_size(mesh, rules)


def write_samples(directory: str, images: np.ndarray, labels: np.ndarray, grid_rows: int, per_class_in_grid: int = 10,
                  step: Optional[int] = None) -> str:
    """samples.npz (images uint8 NxHxWxC, labels) + grid.png with `per_class_in_grid` samples of each class per row."""
    os.makedirs(directory, exist_ok=True)
    if jax.process_index() != 0:
        return directory
    np.savez(os.path.join(directory, "samples.npz"), images=images, labels=labels.astype(np.int64))
    grid = class_grid(images, labels, per_class_in_grid)
    name = f"grid_{step:08d}.png" if step is not None else "grid.png"
    save_png(os.path.join(directory, name), grid)
    return directory


def class_grid(images: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    rows = []
    classes = np.unique(labels)
    for c in classes:
        rows.append(images[labels == c][:per_class])
    k = min(len(r) for r in rows)
    return make_grid(np.concatenate([r[:k] for r in rows], 0), rows=len(classes))
