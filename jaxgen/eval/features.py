"""Feature extractors of the evaluation metrics, behind one interface, and their batched (optionally sharded) apply.

An extractor maps uint8 NHWC images to {'pool': (N, D) features for FID / precision-recall, 'logits': (N, K) for IS
and class consistency}, float32 on the host:
  inception  FID's Inception-v3 (jaxgen.eval.inception): pool3 2048-d, the 1008 unbiased logits (torch-fidelity's IS)
  digits     the embedded digit classifier (jaxgen.eval.digit_metric): 128-d penultimate features, 10 logits
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence

import jax
import numpy as np

from jaxgen.eval import digit_metric


def file_stamp(path: str) -> str:
    """abspath:size:mtime of a file or directory: what a cache or a resumable result keyed on it must change with
    (a re-converted file in the same place is a new file). A missing path stamps as itself."""
    try:
        st = os.stat(path)
    except OSError:
        return str(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def batched_apply(fn: Callable[[jax.Array], Dict[str, jax.Array]], images: np.ndarray, batch_size: int,
                  mesh=None, rules: Optional[Sequence] = None) -> Dict[str, np.ndarray]:
    """`fn` over `images` in fixed-size batches (the last padded with zeros: one compilation), concatenated on the
    host. With a mesh every process passes the same images; each batch is split over the mesh's batch axes and the
    results gathered back to every process."""
    from jax.experimental import multihost_utils

    from jaxgen.parallel import mesh as mesh_lib
    from jaxgen.parallel import sharding as sh

    n = len(images)
    if mesh is not None:
        dp = max(1, mesh_lib.data_parallel_size(mesh, sh.rules_tuple(rules)))
        batch_size = -(-int(batch_size) // dp) * dp
        sharding = sh.batch_sharding(mesh, rules, images.ndim)
    batch_size = max(1, int(batch_size))
    out: Dict[str, list] = {}
    for i in range(0, n, batch_size):
        chunk = images[i:i + batch_size]
        m = len(chunk)
        if m < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - m,) + chunk.shape[1:], chunk.dtype)])
        if mesh is not None:
            chunk = jax.make_array_from_callback(chunk.shape, sharding, lambda idx, c=chunk: c[idx])
            result = multihost_utils.process_allgather(fn(chunk), tiled=True)
        else:
            result = fn(chunk)
        for k, v in result.items():
            out.setdefault(k, []).append(np.asarray(v, np.float32)[:m])
    return {k: np.concatenate(v) for k, v in out.items()}


class Extractor:
    """name, `feature_dim`, `identity` (what its features depend on: weights file, version), and
    __call__(images uint8 NHWC) -> {'pool': (N, D), 'logits': (N, K)} float32."""

    name = ""
    feature_dim = 0
    identity = ""

    def __call__(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        raise NotImplementedError


class InceptionExtractor(Extractor):
    name = "inception"
    feature_dim = 2048

    def __init__(self, weights_path: str, batch_size: int = 100, mesh=None, rules=None):
        from jaxgen.eval.inception import InceptionFID

        self.net = InceptionFID.load(weights_path, batch_size=batch_size, mesh=mesh, rules=rules)
        self.identity = file_stamp(weights_path)

    def __call__(self, images):
        f = self.net(images, features=("2048", "logits_unbiased"))
        return {"pool": f["2048"], "logits": f["logits_unbiased"]}


class DigitExtractor(Extractor):
    """Runs on one device of each process (a 0.1 MFLOP classifier: nothing to gain from the mesh)."""

    name = "digits"
    feature_dim = digit_metric.FEATURE_DIM
    identity = digit_metric.VERSION

    def __init__(self, metric=None):
        self.metric = metric or digit_metric.DigitMetric.load_or_train()

    def __call__(self, images):
        logits, pool = self.metric.logits_and_features(images)
        return {"pool": pool, "logits": logits}
