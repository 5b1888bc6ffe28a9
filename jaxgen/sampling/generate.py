"""Family-agnostic generation: class labels -> uint8 images, compiled once per batch shape, sharded over the batch.

    sampler = Sampler(family, mesh, rules)            # owns the compiled sampler; keep it to sample again for free
    images = sampler.generate(params, frozen, labels, seed, batch_size)
    images = sampler.generate(..., policy={key: values})   # sampling knobs as traced inputs (policy search):
                                                          # `family.sample_with_policy`, compiled once for any values
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxgen.parallel import mesh as mesh_lib
from jaxgen.parallel import sharding as sh
from jaxgen.utils.host_memory import map_large_blocks, release_free_memory
from jaxgen.utils.images import make_grid, save_png, to_uint8


def class_labels(num_classes: int, per_class: int, interleaved: bool = False) -> np.ndarray:
    """[0]*per_class + [1]*per_class + ...: class-major, so grids show one class per row block. `interleaved`:
    0, 1, ..., C-1, 0, 1, ... (evaluation: every shard and every consecutive IS split is class-balanced, as ADM's
    evaluator needs for its splits of 5,000)."""
    classes = np.arange(num_classes, dtype=np.int32)
    return np.tile(classes, per_class) if interleaved else np.repeat(classes, per_class)


# family -> {(batch, policy keys, label sharding): jitted sampler}: every Sampler of a family shares the jitted
# functions, so a program compiled by one (`precompile`) is jax's cached executable for the next.
_JITTED: "weakref.WeakKeyDictionary[Any, Dict[Any, Callable]]" = weakref.WeakKeyDictionary()


class Sampler:
    """`family.sample` jitted once per batch size over the mesh (labels sharded over 'batch'); periodic sampling
    during training reuses the same compiled program."""

    def __init__(self, family, mesh, rules, hand_back_memory: bool = True):
        """`hand_back_memory`: hand the heap's free pages back after `precompile` and once after the first batch
        (`release_free_memory`); False inside a training run, whose per-step temporaries would otherwise come back
        as 4 KB pages."""
        self.family = family
        self.mesh = mesh
        self.rules = sh.rules_tuple(rules)
        self.hand_back_memory = hand_back_memory
        self._first_batch_pending = hand_back_memory  # the after-first-batch hand-back is still to do
        self.data_parallel = max(1, mesh_lib.data_parallel_size(mesh, self.rules))
        self.label_sharding = sh.batch_sharding(mesh, self.rules, 1)
        self._compiled: Dict[Any, Callable] = _JITTED.setdefault(family, {})

    def batch_size(self, requested: int) -> int:
        """The batch `generate` uses for `requested`: a multiple of the data-parallel size."""
        dp = self.data_parallel
        return max(dp, (int(requested) // dp) * dp)

    def _fn(self, batch_size: int, policy_keys: Optional[tuple] = None):
        key = (batch_size, policy_keys, self.label_sharding)
        if key not in self._compiled:
            if policy_keys is None:
                self._compiled[key] = jax.jit(self.family.sample, in_shardings=(None, None, self.label_sharding, None))
            else:
                self._compiled[key] = jax.jit(self.family.sample_with_policy,
                                              in_shardings=(None, None, self.label_sharding, None, None))
        return self._compiled[key]

    def precompile(self, params: Any, frozen: Any, batch_size: int) -> None:
        """Compile `family.sample` for `batch_size` from params / frozen that may be abstract (ShapeDtypeStructs with
        their shardings, e.g. `restore.abstract_params`): done before the weights are loaded, XLA's compile-time
        working memory is handed back (`release_free_memory`) before they arrive, so the peak does not carry both, and
        large blocks get their own mappings from then on (`map_large_blocks`).
        `generate` with the real arrays then finds the executable in jax's cache."""
        batch_size = self.batch_size(batch_size)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            # labels and key made as `generate` makes them (tiny): the same types, so the same cache entry
            labels, rng = self._inputs(np.zeros(0, np.int32), batch_size, 0, 0)
            self._fn(batch_size).lower(params, frozen, labels, rng).compile()
        if self.hand_back_memory:
            release_free_memory()
            map_large_blocks()  # the loaders' and each call's large temporaries: own mappings, handed back when freed

    def _inputs(self, chunk: np.ndarray, batch_size: int, seed: int, index: int):
        """(labels sharded over 'batch', padded with class 0 to batch_size; the key of chunk `index`), under the
        mesh context."""
        padded = np.concatenate([chunk, np.zeros(batch_size - len(chunk), np.int32)]) if len(chunk) < batch_size \
            else chunk
        labels = jax.make_array_from_callback((batch_size,), self.label_sharding, lambda idx: padded[idx])
        return labels, jax.random.fold_in(jax.random.PRNGKey(seed), index)

    def generate(self, params: Any, frozen: Any, labels: np.ndarray, seed: int, batch_size: int,
                 progress: bool = True, policy: Optional[Dict[str, Any]] = None, first_chunk: int = 0) -> np.ndarray:
        """All `labels` in fixed-size chunks (the last one padded); uint8 NHWC on the host; progress with images/s
        and ETA after each chunk. `policy`: {config.sample key: value} passed as traced arrays to
        `family.sample_with_policy` (new values reuse the compiled program). Chunk c draws its noise from
        fold_in(PRNGKey(seed), first_chunk + c): generating a range of a label list that starts at chunk `first_chunk`
        gives the images the whole list would (resumable evaluation)."""
        from jaxgen.train.logger import Progress

        shown = Progress("sample", len(labels)) if progress else None
        batch_size = self.batch_size(batch_size)
        out = []
        t0 = time.time()
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            keys = None if policy is None else tuple(sorted(policy))
            fn = self._fn(batch_size, keys)
            extra = () if policy is None else ({k: np.asarray(policy[k], np.float32) for k in keys},)
            for i in range(0, len(labels), batch_size):
                chunk = labels[i:i + batch_size]
                n = len(chunk)
                images = fn(params, frozen, *self._inputs(chunk, batch_size, seed, first_chunk + i // batch_size),
                            *extra)
                images = multihost_utils.process_allgather(images, tiled=True)
                out.append(to_uint8(np.asarray(images, np.float32))[:n])
                if self._first_batch_pending:
                    # the first call's temporaries may sit in a hole that small blocks then split, so the next call
                    # places them anew: handing the old pages back keeps the peak at the first call's
                    self._first_batch_pending = False
                    release_free_memory()
                if shown is not None:
                    shown.update(i + n)
        seconds = max(time.time() - t0, 1e-9)
        logging.info("sampled %d images in %.1fs (%.2f images/s, batch %d)", len(labels), seconds,
                     len(labels) / seconds, batch_size)
        return np.concatenate(out, axis=0)


def generate(family, params: Any, frozen: Any, labels: np.ndarray, seed: int, batch_size: int, mesh,
             rules) -> np.ndarray:
    """One-off `Sampler(family, mesh, rules).generate(...)` (compiles each call: keep a Sampler to reuse it)."""
    return Sampler(family, mesh, rules).generate(params, frozen, labels, seed, batch_size)


def write_samples(directory: str, images: np.ndarray, labels: np.ndarray, per_class_in_grid: int = 10,
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
