"""Reference statistics of the real data: loading the published files, and computing them from any jaxgen dataset.

Accepted .npz files (`config.eval.reference`):
  ADM evaluator     VIRTUAL_imagenet256_labeled.npz: `mu`, `sigma` (full train set) and `arr_0`, the 10,000-image
                    reference batch whose features precision / recall use (computed here once, then cached)
  pytorch-fid / torch-fidelity   `mu`, `sigma` only (FID and IS; no precision / recall)
  jaxgen            written by `--mode=reference`: `mu`, `sigma`, `pool` (features of random examples), `extractor`
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Optional

import jax
import numpy as np

from jaxgen.errors import ConfigError, DataError
from jaxgen.eval.features import file_stamp
from jaxgen.eval.metrics import feature_stats


@dataclass
class Reference:
    mu: np.ndarray
    sigma: np.ndarray
    pool: Optional[np.ndarray]  # (M, D) features for precision / recall; None when the file has only mu / sigma
    source: str


def validate(path: str, extractor_name: str, feature_dim: int) -> None:
    """Cheap checks of a reference file before any sample is generated: it exists, holds statistics / features /
    images, was made with this metric's extractor, and its statistics have the extractor's feature size."""
    if not os.path.isfile(path):
        raise ConfigError(f"config.eval.reference={path!r} does not exist: download ADM's reference batch (e.g."
                          " VIRTUAL_imagenet256_labeled.npz) or compute one with --mode=reference")
    with np.load(path) as z:
        keys = set(z.files)
        made_by = str(z["extractor"]) if "extractor" in keys else ""
        if made_by and made_by != extractor_name:
            raise ConfigError(f"config.eval.reference {path} holds {made_by} features but config.eval.metric is "
                              f"{extractor_name!r}: compute a reference with this metric (--mode=reference)")
        if not ({"mu", "sigma"} <= keys or "pool" in keys or "arr_0" in keys):
            raise DataError(f"config.eval.reference {path} has neither mu / sigma nor images (arr_0) nor features "
                            f"(pool); it holds {sorted(keys)}")
        dim = z["mu"].shape[-1] if "mu" in keys else (z["pool"].shape[-1] if "pool" in keys else feature_dim)
    if dim != feature_dim:
        raise ConfigError(f"config.eval.reference {path} has {dim}-d statistics but the {extractor_name} features are "
                          f"{feature_dim}-d: use a reference made with config.eval.metric={extractor_name!r}")


def load(path: str, extractor, cache_dir: Optional[str] = None, need_pool: bool = True) -> Reference:
    """The reference of `path` for `extractor`; ADM `arr_0` images are featurised (only when `need_pool`, or when the
    file has no mu / sigma) once and cached in `cache_dir`."""
    validate(path, extractor.name, extractor.feature_dim)
    with np.load(path) as z:
        keys = set(z.files)
        mu = np.asarray(z["mu"], np.float64) if "mu" in keys else None
        sigma = np.asarray(z["sigma"], np.float64) if "sigma" in keys else None
        pool = np.asarray(z["pool"], np.float32) if "pool" in keys else None
        if pool is None and "arr_0" in keys and (need_pool or mu is None or sigma is None):
            pool = _featurise_cached(path, z, extractor, cache_dir)
    if mu is None or sigma is None:
        mu, sigma = feature_stats(pool)
    return Reference(mu, sigma, pool, os.path.abspath(path))


def _featurise_cached(path, z, extractor, cache_dir):
    key = hashlib.sha256(f"{file_stamp(path)}:{extractor.identity}".encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"reference_{extractor.name}_{key}.npy") if cache_dir else ""
    if cache and os.path.isfile(cache):
        return np.load(cache)
    images = np.asarray(z["arr_0"])
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(f"config.eval.reference {path}: arr_0 must be uint8 NHWC images, got {images.dtype} "
                        f"{images.shape}")
    logging.info("eval: features of the %d reference images of %s", len(images), path)
    pool = extractor(images)["pool"]
    if cache and jax.process_index() == 0:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = cache + ".tmp.npy"
        np.save(tmp, pool)
        os.replace(tmp, cache)
    return pool


def digits_reference(extractor) -> Reference:
    """The 500 held-out test digits (what `digit_fd` has always compared against)."""
    from jaxgen.data.digits import load_digits

    images, _ = load_digits("test")
    pool = extractor(images)["pool"]
    mu, sigma = feature_stats(pool)
    return Reference(mu, sigma, pool, "digits:test")


def for_config(config, extractor, cache_dir: Optional[str] = None, need_pool: bool = True) -> Reference:
    if config.eval.reference:
        return load(config.eval.reference, extractor, cache_dir, need_pool)
    if config.eval.metric == "digits":
        return digits_reference(extractor)
    raise ConfigError("config.eval.reference is empty: give ADM's VIRTUAL_imagenet256_labeled.npz, a pytorch-fid / "
                      "torch-fidelity statistics file, or compute one with --mode=reference")


# ---------------------------------------------------------------------------------------------- --mode=reference

class RunningMoments:
    """Mean and covariance (N - 1) of streamed features, accumulated in float64."""

    def __init__(self, dim: int):
        self.n = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, features) -> None:
        f = np.asarray(features, np.float64)
        self.n += len(f)
        self.total += f.sum(0)
        self.outer += f.T @ f

    def stats(self):
        if self.n < 2:
            raise DataError(f"reference statistics need at least 2 examples, got {self.n}")
        mu = self.total / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)


def compute(config, out_path: str, extractor, batch_size: int = 0) -> dict:
    """Statistics of `config.data` (split eval.reference_split, first eval.reference_limit examples) for `extractor`,
    streamed (the dataset is never in memory), plus the features of eval.reference_features random examples for
    precision / recall. Written to `out_path` (what config.eval.reference accepts)."""
    import grain

    from jaxgen.data import pipeline as data_pipeline
    from jaxgen.train.logger import Progress

    data_cfg = config.data
    split = config.eval.reference_split
    source = data_pipeline.build_source(data_cfg, split)
    n = len(source) if not config.eval.reference_limit else min(len(source), int(config.eval.reference_limit))
    if n < 2:
        raise DataError(f"data source {source!r} has {n} examples; reference statistics need at least 2")
    keep = np.zeros(n, bool)
    keep[np.random.RandomState(0).choice(n, min(n, int(config.eval.reference_features)), replace=False)] = True
    batch = int(batch_size or config.eval.feature_batch)
    ds = grain.MapDataset.source(source)[:n].to_iter_dataset(data_pipeline.read_options(source, data_cfg, batch))
    moments, kept, shown = None, [], Progress("reference", n)
    images, done = [], 0

    def flush():
        nonlocal moments, images, done
        x = np.stack(images).astype(np.uint8)
        pool = extractor(x)["pool"]
        moments = moments or RunningMoments(pool.shape[1])
        moments.add(pool)
        kept.append(pool[keep[done:done + len(x)]])
        done += len(x)
        images = []
        shown.update(done)

    for example in ds:
        images.append(np.asarray(example["image"]))
        if len(images) == batch:
            flush()
    if images:
        flush()
    mu, sigma = moments.stats()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, pool=np.concatenate(kept), extractor=np.str_(extractor.name),
             num_examples=np.int64(n), split=np.str_(split))
    os.replace(tmp, out_path)
    logging.info("reference: %d examples of %r -> %s", n, source, out_path)
    return {"path": out_path, "num_examples": n, "num_pool_features": int(keep.sum()), "extractor": extractor.name}
