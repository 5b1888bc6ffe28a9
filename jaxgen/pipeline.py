"""Run modes: train (tokenizer stage -> latent cache -> generator), sample, eval, cache.

A two-stage family is two runs of one system: the tokenizer is trained by the same trainer in
<workdir>/tokenizer (unless config.tokenizer.workdir / .checkpoint point at one), its latents are cached
by `cache`, and the generator trains on them.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from jaxgen import families
from jaxgen.errors import ConfigError, UserError
from jaxgen.train import export

MODES = ("train", "sample", "eval", "cache")


def save_config(config, workdir: str, name: str = "config") -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"{name}.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------- tokenizer

def tokenizer_config(config) -> Optional[ml_collections.ConfigDict]:
    tok = config.get("tokenizer")
    if tok is None or tok.get("config") is None:
        return None
    return tok.config


def tokenizer_workdir(config, workdir: str) -> str:
    tok = config.tokenizer
    return os.path.abspath(tok.workdir) if tok.get("workdir") else os.path.join(os.path.abspath(workdir), "tokenizer")


def tokenizer_source(config, workdir: str) -> Optional[str]:
    """Where the tokenizer params come from: an explicit params checkpoint, or a tokenizer run's workdir."""
    if tokenizer_config(config) is None:
        return None
    explicit = config.tokenizer.get("checkpoint", "")
    if explicit:
        if not os.path.exists(explicit):
            raise UserError(f"tokenizer checkpoint {explicit} does not exist; convert one with "
                            f"`python -m jaxgen.convert` or clear config.tokenizer.checkpoint to train one")
        return os.path.abspath(explicit)
    return tokenizer_workdir(config, workdir)


def ensure_tokenizer(config, workdir: str) -> Optional[str]:
    """Train the tokenizer when none is given and none is finished yet (resumes a half-trained one)."""
    tok_cfg = tokenizer_config(config)
    if tok_cfg is None:
        return None
    src = tokenizer_source(config, workdir)
    if config.tokenizer.get("checkpoint", ""):
        return src
    if export.is_params_dir(os.path.join(src, "export")):
        return src
    logging.info("stage 1/2: training the %s tokenizer in %s", tok_cfg.family, src)
    train(tok_cfg, src)
    return src


def load_tokenizer_params(config, workdir: str) -> Any:
    src = tokenizer_source(config, workdir)
    if src is None:
        return None
    path = src if export.is_params_dir(src) else os.path.join(src, "export")
    if not export.is_params_dir(path):
        raise UserError(f"no trained tokenizer found at {src}; run --mode=train first (it trains one) or set "
                        f"config.tokenizer.checkpoint to a converted tokenizer")
    return export.load_params(path)


def frozen_for(config, workdir: str) -> dict:
    params = load_tokenizer_params(config, workdir)
    return {} if params is None else {"tokenizer": params}


# ----------------------------------------------------------------------------------------------- cache

def cache_dir(config, workdir: str) -> str:
    return os.path.abspath(config.data.data_dir) if config.data.get("data_dir") else os.path.join(
        os.path.abspath(workdir), "latent_cache")


def cache_latents(config, workdir: str) -> str:
    """Encode the tokenizer's dataset (each image and its flip) into moments once: `--mode=cache`.

    Every process encodes its rows of each global batch on the mesh; process 0 writes the cache (memory-mapped, so
    ImageNet-sized caches never sit in host memory). meta.json is written last: an interrupted cache is redone.
    """
    from jaxgen.data import pipeline as data_pipeline
    from jaxgen.data import sources
    from jaxgen.parallel import mesh as mesh_lib
    from jaxgen.parallel import sharding as sh
    from jaxgen.train.trainer import put_frozen
    from jax.experimental import multihost_utils

    tok_cfg = tokenizer_config(config)
    if tok_cfg is None:
        raise ConfigError(f"family {config.family} has no tokenizer, so there is nothing to cache; "
                          f"use --mode=train")
    out = cache_dir(config, workdir)
    if sources.latent_cache_exists(out):
        logging.info("latent cache already present in %s", out)
        return out
    tok_family = families.build(tok_cfg)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = sh.rules_tuple(config.mesh.rules)
    params = put_frozen(load_tokenizer_params(config, workdir), mesh)
    dp = mesh_lib.data_parallel_size(mesh, rules)
    batch_size = max(dp, (int(config.get("cache_batch_size", 256)) // dp) * dp)

    @jax.jit
    def encode(p, images):
        return tok_family.encode_moments(p, images), tok_family.encode_moments(p, images[:, :, ::-1])

    writer, count, t0 = None, 0, time.time()
    with jax.set_mesh(mesh):
        for local in data_pipeline.iterate_dataset_once(tok_cfg.data, batch_size=batch_size):
            batch = sh.global_batch({k: local[k] for k in ("image", "label", "mask", "index")}, mesh, rules)
            moments, moments_flip = encode(params, batch["image"])
            host = multihost_utils.process_allgather(
                {"moments": moments, "moments_flip": moments_flip, "label": batch["label"], "mask": batch["mask"],
                 "index": batch["index"]}, tiled=True)
            if writer is None and jax.process_index() == 0:
                total = len(data_pipeline.build_source(tok_cfg.data))
                writer = sources.LatentCacheWriter(out, total, host["moments"].shape[1:])
            keep = np.asarray(host["mask"], bool)
            if writer is not None:
                writer.write(np.asarray(host["index"])[keep], np.asarray(host["moments"])[keep],
                             np.asarray(host["moments_flip"])[keep], np.asarray(host["label"])[keep])
            count += int(keep.sum())
    if writer is not None:
        writer.finish({"tokenizer": tok_cfg.family, "dataset": tok_cfg.data.to_dict()})
    multihost_utils.sync_global_devices("latent_cache_written")
    logging.info("cached the moments of %d images (and their flips) in %s (%.0fs)", count, out, time.time() - t0)
    return out


# ----------------------------------------------------------------------------------------------- train

def train(config, workdir: str):
    """Train `config.family` in `workdir` (auto-resume); for a two-stage family, the tokenizer stage first."""
    from jaxgen.data import pipeline as data_pipeline
    from jaxgen.train.trainer import Trainer

    workdir = os.path.abspath(workdir)
    save_config(config, workdir)
    frozen = {}
    if tokenizer_config(config) is not None:
        ensure_tokenizer(config, workdir)
        if config.data.source == "cached":
            cache_latents(config, workdir)
        frozen = frozen_for(config, workdir)
        logging.info("stage 2/2: training %s in %s", config.family, workdir)
    data_cfg = _resolved_data(config, workdir)
    family = families.build(config)
    trainer = Trainer(config, workdir, frozen=frozen, family=family)
    data_iter = data_pipeline.make_train_iterator(data_cfg, family.batch_keys, config.batch_size, seed=config.seed)
    on_sample = _periodic_sampler(config, workdir, family) if config.sample_every else None
    result = trainer.run(data_iter, on_sample=on_sample)
    if not result.stopped_by_signal and result.step >= config.total_steps:
        _export_final(trainer, config, workdir)
    trainer.close()
    return result


def _resolved_data(config, workdir):
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    if data_cfg.source == "cached" and not data_cfg.data_dir:
        data_cfg.data_dir = cache_dir(config, workdir)
    return data_cfg


def _export_final(trainer, config, workdir):
    """A finished run also writes a params-only export (what a later stage or a sampler loads)."""
    state = trainer.state
    export.save_params(os.path.join(workdir, "export"), state.params, state.ema_params,
                       {"family": config.family, "step": int(jax.device_get(state.step))})


def _periodic_sampler(config, workdir, family):
    from jaxgen import sampling

    def on_sample(trainer, step, logger):
        params = trainer.state.ema_params if (config.sample.use_ema and trainer.state.ema_params is not None) \
            else trainer.state.params
        labels = sampling.class_labels(config.data.num_classes, max(1, min(config.sample.num_per_class, 10)))
        images = sampling.generate(family, params, trainer.frozen, labels, config.seed + step,
                                   min(config.sample.batch_size, len(labels)), trainer.mesh, trainer.rules)
        grid = sampling.class_grid(images, labels, 10)
        if jax.process_index() == 0:
            from jaxgen.utils.images import save_png

            save_png(os.path.join(workdir, "samples", f"train_grid_{step:08d}.png"), grid)
        logger.image("samples", step, grid)

    return on_sample


# ----------------------------------------------------------------------------------------------- sample / eval

def load_for_sampling(config, workdir: str):
    from jaxgen.train.trainer import put_frozen, restore_params

    family = families.build(config)
    family.require_sampler()
    source = workdir
    if not os.path.isdir(os.path.join(workdir, "checkpoints")) and config.get("init_from", ""):
        source = config.init_from
    params, mesh = restore_params(config, source, family, prefer_ema=config.sample.use_ema)
    frozen = put_frozen(frozen_for(config, workdir), mesh)
    return family, params, frozen, mesh


def sample(config, workdir: str) -> str:
    from jaxgen import sampling

    family, params, frozen, mesh = load_for_sampling(config, workdir)
    labels = sampling.class_labels(config.data.num_classes, config.sample.num_per_class)
    images = sampling.generate(family, params, frozen, labels, config.seed, config.sample.batch_size, mesh,
                               config.mesh.rules)
    out = sampling.write_samples(os.path.join(workdir, "samples"), images, labels, config.sample.grid_rows)
    logging.info("wrote %s/samples.npz and grid.png", out)
    return out


def evaluate(config, workdir: str) -> dict:
    """Digit metric of fresh samples: class_consistency and digit_fd (with the real-vs-real value for scale)."""
    from jaxgen import sampling
    from jaxgen.eval.digit_metric import DigitMetric

    if config.data.source not in ("digits", "cached") or (config.data.source == "cached" and (
            tokenizer_config(config) is None or tokenizer_config(config).data.source != "digits")):
        raise ConfigError("--mode=eval computes the embedded digit metric, which needs a model trained on the bundled "
                          "digits (data.source='digits'); ImageNet FID needs Inception weights (not bundled)")
    family, params, frozen, mesh = load_for_sampling(config, workdir)
    labels = sampling.class_labels(config.data.num_classes, config.sample.num_per_class)
    images = sampling.generate(family, params, frozen, labels, config.seed, config.sample.batch_size, mesh,
                               config.mesh.rules)
    sampling.write_samples(os.path.join(workdir, "samples"), images, labels, config.sample.grid_rows)
    metric = DigitMetric.load_or_train()
    result = metric.evaluate(images, labels)
    result = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in result.items()}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
    logging.info("eval: %s", result)
    return result


def run(config, workdir: str, mode: str = "train"):
    if mode not in MODES:
        raise ConfigError(f"unknown --mode={mode}; use one of {', '.join(MODES)}")
    if mode == "train":
        return train(config, workdir)
    if mode == "sample":
        return sample(config, workdir)
    if mode == "eval":
        return evaluate(config, workdir)
    return cache_latents(config, workdir)
