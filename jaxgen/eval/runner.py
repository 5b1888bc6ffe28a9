"""--mode=eval: N class-balanced samples in resumable shards, their features streamed to disk, then the metrics.

    result = runner.evaluate(config, workdir)      # writes <workdir>/eval.json

N = data.num_classes x sample.num_per_class (50,000 = 50 per class on the paper configs), generated with the
config.sample settings by every process and device together (jaxgen.sampling.Sampler). Shard s holds images
[s * S, (s + 1) * S) with S = eval.shard_size rounded up to the sampling batch; chunk c of the whole label list always
draws its noise from fold_in(seed, c), so a resumed run generates exactly the images an uninterrupted one would.
A finished shard (features, logits, labels, the grid's images and, when samples are kept, its uint8 images) is one
.npz written to a temporary name and renamed: `kill -9` at any point loses at most the shard in progress. Shards live
in <workdir>/eval/<fingerprint>/, the fingerprint covering the weights, the sampling settings, N, S and the
extractor, so changed settings never reuse old shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zipfile
from typing import Dict, List, Optional

import jax
import numpy as np

from jaxgen.errors import ConfigError
from jaxgen.eval import metrics as M
from jaxgen.eval import reference as reference_lib
from jaxgen.eval.features import DigitExtractor, InceptionExtractor, file_stamp

METRICS = ("digits", "inception")
FEATURE_DIMS = {"digits": DigitExtractor.feature_dim, "inception": InceptionExtractor.feature_dim}
SAMPLES_NPZ = ("jaxgen", "adm", "none")
_GRID_CLASSES = 10  # the grid shows the first classes only (1000 ImageNet rows would be unreadable)


def check_values(config) -> None:
    """The config.eval values every eval-related mode reads (eval, reference, a search on FID)."""
    e = config.eval
    if e.metric not in METRICS:
        raise ConfigError(f"config.eval.metric={e.metric!r} is not one of {', '.join(METRICS)}")
    if e.samples_npz not in SAMPLES_NPZ:
        raise ConfigError(f"config.eval.samples_npz={e.samples_npz!r} is not one of {', '.join(SAMPLES_NPZ)}")
    if e.inception_score not in M.IS_CONVENTIONS:
        raise ConfigError(f"config.eval.inception_score={e.inception_score!r} is not one of "
                          f"{', '.join(M.IS_CONVENTIONS)}")
    if e.fid_method not in M.FID_METHODS:
        raise ConfigError(f"config.eval.fid_method={e.fid_method!r} is not one of {', '.join(M.FID_METHODS)}")
    for key in ("shard_size", "feature_batch", "is_splits", "pr_k", "reference_features"):
        if int(e[key]) < 1:
            raise ConfigError(f"config.eval.{key}={e[key]!r} must be >= 1")
    if int(e.reference_limit) < 0:
        raise ConfigError(f"config.eval.reference_limit={e.reference_limit!r} must be >= 0 (0: all examples)")


def check(config) -> None:
    """Config errors of --mode=eval, before anything loads or generates."""
    e = config.eval
    check_values(config)
    if e.metric == "digits" and config.data.source != "digits":
        raise ConfigError("config.eval.metric='digits' scores samples with the embedded digit classifier, which "
                          "needs a model of the bundled digits (data.source='digits'); use eval.metric='inception'")
    if e.metric == "inception":
        check_inception_files(config)
    n = int(config.data.num_classes) * int(config.sample.num_per_class)
    if e.inception_score == "torch_fidelity" and n < int(e.is_splits):
        raise ConfigError(f"{n} samples are fewer than config.eval.is_splits={e.is_splits}: raise "
                          "sample.num_per_class or lower eval.is_splits")
    if e.precision_recall and n <= int(e.pr_k):
        raise ConfigError(f"precision / recall with config.eval.pr_k={e.pr_k} needs more than {e.pr_k} samples "
                          f"(N = {n}); raise sample.num_per_class or set eval.precision_recall=False")
    if e.reference:
        reference_lib.validate(e.reference, e.metric, FEATURE_DIMS[e.metric])


def check_inception_files(config) -> None:
    """The Inception weights and the reference statistics FID needs are files."""
    e = config.eval
    if not e.inception_weights or not os.path.isfile(e.inception_weights):
        raise ConfigError(f"config.eval.inception_weights={e.inception_weights!r} is not a file: download "
                          "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid "
                          "releases) and pass --config.eval.inception_weights=<path>")
    if not e.reference or not os.path.isfile(e.reference):
        raise ConfigError(f"config.eval.reference={e.reference!r} is not a file: download ADM's "
                          "VIRTUAL_imagenet256_labeled.npz (github.com/openai/guided-diffusion/tree/main/"
                          "evaluations) or compute one with --mode=reference")


def build_extractor(config, mesh=None):
    if config.eval.metric == "inception":
        return InceptionExtractor(config.eval.inception_weights, config.eval.feature_batch, mesh, config.mesh.rules)
    return DigitExtractor()


# ---------------------------------------------------------------------------------------------- shards

class ShardStore:
    """shard_<s>.npz files of one evaluation; only process 0 writes, every process agrees on what is done."""

    def __init__(self, directory: str):
        self.directory = directory
        if jax.process_index() == 0:
            os.makedirs(directory, exist_ok=True)

    def path(self, s: int) -> str:
        return os.path.join(self.directory, f"shard_{s:05d}.npz")

    def done(self, num_shards: int) -> np.ndarray:
        from jax.experimental import multihost_utils

        mask = np.array([os.path.isfile(self.path(s)) for s in range(num_shards)], np.int32)
        if jax.process_count() > 1:
            mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
        return mask.astype(bool)

    def write(self, s: int, **arrays) -> None:
        if jax.process_index() != 0:
            return
        tmp = self.path(s) + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self.path(s))  # atomic: a shard file is complete or absent

    def read(self, s: int, keys) -> Dict[str, np.ndarray]:
        with np.load(self.path(s)) as z:  # an npz reads only the members asked for
            return {k: z[k] for k in keys}


def fingerprint(config, workdir: str, family, weights: str, num: int, shard: int, batch: int, extractor) -> str:
    """What the shards' contents depend on: the generator's weights (source, step, file stamp), its tokenizer's
    weights and config, the model / sampling settings, the seed, N, the shard and batch sizes (chunk c of the label
    list draws fold_in(seed, c)), the extractor and whether images are kept."""
    from jaxgen import pipeline
    from jaxgen.train import restore

    _, path = restore.find_source(config, workdir)
    tokenizer = file_stamp(pipeline.tokenizer_source(config, workdir)) if family.tokenizer is not None else ""
    spec = dict(weights=weights, weights_stamp=file_stamp(path), tokenizer=tokenizer,
                tokenizer_config=config.tokenizer.to_dict(), sample=config.sample.to_dict(), seed=int(config.seed),
                num=num, shard=shard, batch=batch, extractor=extractor.name, extractor_identity=extractor.identity,
                family=config.family, model=config.model.to_dict(), keep_images=config.eval.samples_npz != "none")
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- npz

def write_npz_streaming(path: str, names: List[str], rows: int, dtypes: List[np.dtype], chunks) -> None:
    """An .npz (as np.savez writes) of `rows`-row arrays that arrive in row chunks: `chunks()` yields one tuple of
    arrays per step (one per name; each array's row shape is its first chunk's). The images of 50,000 samples are
    never all in memory. Write-then-rename."""
    tmp = path + ".tmp"
    # zipfile writes one member at a time: each array is a pass over the chunks
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i, (name, dtype) in enumerate(zip(names, dtypes)):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                for j, parts in enumerate(chunks()):
                    part = np.ascontiguousarray(parts[i], dtype=dtype)
                    if j == 0:
                        np.lib.format.write_array_header_1_0(
                            f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                                "shape": (rows,) + part.shape[1:]})
                    f.write(part.tobytes())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- evaluate

def evaluate(config, workdir: str) -> dict:
    from jaxgen import pipeline, sampling
    from jaxgen.train.logger import Progress

    t0 = time.time()
    check(config)
    family, params, frozen, mesh, weights = pipeline.load_for_sampling(config, workdir, "eval", with_source=True)
    extractor = build_extractor(config, mesh)
    eval_root = os.path.join(workdir, "eval")
    # interleaved classes: every shard and every consecutive IS split of ADM's evaluator is class-balanced
    labels = sampling.class_labels(config.data.num_classes, config.sample.num_per_class, interleaved=True)
    n = len(labels)
    sampler = sampling.Sampler(family, mesh, config.mesh.rules)
    batch = sampler.batch_size(config.sample.batch_size)
    shard = -(-int(config.eval.shard_size) // batch) * batch
    num_shards = -(-n // shard)
    keep_images = config.eval.samples_npz != "none"
    store = ShardStore(os.path.join(eval_root, fingerprint(config, workdir, family, weights, n, shard, batch,
                                                           extractor)))
    done = store.done(num_shards)
    resumed = int(sum(min(shard, n - s * shard) for s in np.flatnonzero(done)))
    if resumed:
        logging.info("eval: resuming %s: %d of %d shards done", store.directory, int(done.sum()), num_shards)
    shown = Progress("eval", n, done_before=resumed)
    finished, gen_seconds = resumed, 0.0
    for s in range(num_shards):
        if done[s]:
            continue
        lo, hi = s * shard, min((s + 1) * shard, n)
        t = time.time()
        images = sampler.generate(params, frozen, labels[lo:hi], config.seed, batch, progress=False,
                                  first_chunk=lo // batch)
        gen_seconds += time.time() - t
        feats = extractor(images)
        grid = labels[lo:hi] < _GRID_CLASSES
        arrays = dict(pool=feats["pool"], logits=feats["logits"], labels=labels[lo:hi].astype(np.int64),
                      grid_images=images[grid], grid_labels=labels[lo:hi][grid].astype(np.int64))
        if keep_images:
            arrays["images"] = images
        store.write(s, **arrays)
        finished += hi - lo
        shown.update(finished)
    result = {"metric": config.eval.metric, "num_samples": n, "process": jax.process_index()}
    if jax.process_index() == 0:  # process 0 wrote the shards; it alone reads them and scores, on its own devices
        result = _score(config, workdir, store, labels, t0, resumed, gen_seconds, shard, weights, mesh)
    if jax.process_count() > 1:  # nobody exits (and starts the distributed shutdown clock) while process 0 scores
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxgen_eval_done")
    return result


def _score(config, workdir, store, labels, t0, resumed, gen_seconds, shard, weights, mesh) -> dict:
    n, num_shards = len(labels), -(-len(labels) // shard)
    extractor = build_extractor(config, mesh=None)  # local: only this process featurises an ADM reference batch
    reference = reference_lib.for_config(config, extractor, cache_dir=os.path.join(workdir, "eval"),
                                         need_pool=bool(config.eval.precision_recall))
    shards = [store.read(s, ("pool", "logits", "grid_images", "grid_labels")) for s in range(num_shards)]
    pool = np.concatenate([d["pool"] for d in shards])
    logits = np.concatenate([d["logits"] for d in shards])
    result = _metrics(config, extractor, reference, pool, logits, labels)
    result.update(num_samples=n, seconds=round(time.time() - t0, 3),
                  generation_images_per_second=round((n - resumed) / gen_seconds, 3) if gen_seconds else None,
                  resumed_images=resumed, shards=num_shards, shard_size=shard, weights=weights,
                  reference=reference.source, settings=config.sample.to_dict(), seed=int(config.seed),
                  mesh=dict(shape=list(mesh.devices.shape), axes=list(mesh.axis_names),
                            devices=int(mesh.devices.size), processes=jax.process_count(),
                            platform=jax.devices()[0].platform))
    _write_outputs(config, workdir, store, shards, labels, result)
    logging.info("eval: %s", {k: v for k, v in result.items() if k != "settings"})
    return result


def _metrics(config, extractor, reference, pool, logits, labels) -> dict:
    e = config.eval
    mu, sigma = M.feature_stats(pool)
    fd = M.frechet_distance(mu, sigma, reference.mu, reference.sigma, method=e.fid_method)
    is_mean, is_std = M.inception_score(logits, e.is_splits, e.inception_score)
    out: Dict[str, Optional[float]] = {"metric": e.metric}
    if e.precision_recall and reference.pool is not None:
        out["precision"], out["recall"] = M.precision_recall(reference.pool, pool, k=int(e.pr_k))
    elif e.precision_recall:
        logging.warning("eval: %s holds only mu / sigma: no precision / recall (give ADM's reference batch or a "
                        "--mode=reference file)", reference.source)
        out["precision"] = out["recall"] = None
    if e.metric == "inception":
        out.update(fid=fd, inception_score=is_mean, inception_score_std=is_std)
    else:
        dm = extractor.metric
        out.update(digit_fd=fd, digit_is=is_mean, digit_is_std=is_std,
                   class_consistency=float(np.mean(logits.argmax(-1) == labels)),
                   real_vs_real_fd=dm.real_vs_real_fd(), classifier_test_accuracy=dm.test_accuracy)
    return out


def _write_outputs(config, workdir, store, shards, labels, result) -> None:
    from jaxgen.sampling.generate import class_grid
    from jaxgen.utils.images import save_png

    out_dir = os.path.join(workdir, "samples")
    os.makedirs(out_dir, exist_ok=True)
    grid_images = np.concatenate([d["grid_images"] for d in shards])
    grid_labels = np.concatenate([d["grid_labels"] for d in shards])
    if len(grid_images):
        save_png(os.path.join(out_dir, "grid.png"), class_grid(grid_images, grid_labels, config.sample.grid_per_class))
    if config.eval.samples_npz != "none":
        names = ["images", "labels"] if config.eval.samples_npz == "jaxgen" else ["arr_0", "arr_1"]
        path = os.path.join(out_dir, "samples.npz")
        parts = lambda: (tuple(store.read(s, ("images", "labels")).values()) for s in range(len(shards)))  # noqa
        write_npz_streaming(path, names, len(labels), [np.uint8, np.int64], parts)
        result["samples_npz"] = path
    with open(os.path.join(workdir, "eval.json.tmp"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    os.replace(os.path.join(workdir, "eval.json.tmp"), os.path.join(workdir, "eval.json"))
