"""Run modes: train (tokenizer stage -> code cache -> generator), sample, eval, cache.

A two-stage family is two runs of one system: the tokenizer (`family.tokenizer`, resolved once by
`jaxgen.families.build_tokenizer`) is trained by the same trainer in <workdir>/tokenizer (unless
config.tokenizer.workdir / .checkpoint point at one), its codes are cached by `cache`, and the generator trains on them.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from jaxgen import families, preflight
from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.parallel import sharding as sh
from jaxgen.train import export, restore
from jaxgen.utils.host_memory import release_free_memory

MODES = ("train", "sample", "eval", "cache", "search", "reference")


def save_config(config, workdir: str, name: str = "config") -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"{name}.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------- tokenizer

def tokenizer_workdir(config, workdir: str) -> str:
    tok = config.tokenizer
    return os.path.abspath(tok.workdir) if tok.get("workdir") else os.path.join(os.path.abspath(workdir), "tokenizer")


def tokenizer_source(config, workdir: str) -> str:
    """Where the tokenizer params come from: an explicit params checkpoint, or a tokenizer run's workdir."""
    explicit = config.tokenizer.get("checkpoint", "")
    if explicit:
        if not os.path.exists(explicit):
            raise CheckpointError(f"tokenizer checkpoint {explicit} does not exist; convert one with "
                                  f"`python -m jaxgen.convert` or clear config.tokenizer.checkpoint to train one")
        return os.path.abspath(explicit)
    return tokenizer_workdir(config, workdir)


def load_frozen(config, family, workdir: str, mesh) -> dict:
    """frozen['tokenizer'] = the tokenizer's params, replicated on `mesh` ({} for a family without a tokenizer)."""
    if family.tokenizer is None:
        return {}
    src = tokenizer_source(config, workdir)
    if restore.export_dir(src) is None and not os.path.isdir(restore.checkpoint_dir(src)):
        raise CheckpointError(f"no trained tokenizer found at {src}; run --mode=train first (it trains one) or set "
                              f"config.tokenizer.checkpoint to a converted tokenizer")
    params, _ = restore.load_params(families.tokenizer_run_config(config), src, family.tokenizer, mesh,
                                    prefer_ema=True)
    return {"tokenizer": restore.replicate(params, mesh)}


# ----------------------------------------------------------------------------------------------- cache

def cache_dir(config, workdir: str) -> str:
    return os.path.abspath(config.data.cache_dir) if config.data.get("cache_dir") else os.path.join(
        os.path.abspath(workdir), "code_cache")


def cache_codes(config, workdir: str, family=None) -> str:
    """Encode the tokenizer's dataset (each image and its flip) once through the tokenizer protocol: `--mode=cache`.

    Every process encodes its rows of each global batch on the mesh; process 0 writes the cache (memory-mapped, so
    ImageNet-sized caches never sit in host memory). meta.json is written last: an interrupted cache is redone.
    """
    from jax.experimental import multihost_utils

    from jaxgen.data import pipeline as data_pipeline
    from jaxgen.data import sources
    from jaxgen.parallel import mesh as mesh_lib
    from jaxgen.parallel import sharding as sh

    if family is None:  # called on its own (--mode=cache), not as a step of a checked train run
        preflight.check(config, workdir, "cache")
        family = families.build(config)
    tok = family.tokenizer
    if tok is None:
        raise ConfigError(f"family {config.family} has no tokenizer, so there is nothing to cache; use --mode=train")
    out = cache_dir(config, workdir)
    if sources.code_cache_exists(out):
        logging.info("code cache already present in %s", out)
        return out
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = sh.rules_tuple(config.mesh.rules)
    params = load_frozen(config, family, workdir, mesh)["tokenizer"]
    dp = mesh_lib.data_parallel_size(mesh, rules)
    batch_size = max(dp, (int(config.get("cache_batch_size", 256)) // dp) * dp)
    specs = {k: (s.shape, s.dtype) for k, s in tok.code_shapes().items()}

    @jax.jit
    def encode(p, images):
        return tok.encode(p, images), tok.encode(p, images[:, :, ::-1])

    from jaxgen.train.logger import Progress

    tok_data = families.tokenizer_run_config(config).data
    total = len(data_pipeline.build_source(tok_data))
    shown = Progress(f"cache {tok.name} codes", total)
    writer, count, t0 = None, 0, time.time()
    with jax.set_mesh(mesh):
        for local in data_pipeline.iterate_dataset_once(tok_data, batch_size=batch_size):
            batch = sh.global_batch({k: local[k] for k in ("image", "label", "mask", "index")}, mesh, rules)
            codes, codes_flip = encode(params, batch["image"])
            host = multihost_utils.process_allgather(
                {"codes": codes, "flip": codes_flip, "label": batch["label"], "mask": batch["mask"],
                 "index": batch["index"]}, tiled=True)
            if writer is None and jax.process_index() == 0:
                writer = sources.CodeCacheWriter(out, total, specs)
            keep = np.asarray(host["mask"], bool)
            if writer is not None:
                writer.write(np.asarray(host["index"])[keep], {k: np.asarray(v)[keep] for k, v in host["codes"].items()},
                             {k: np.asarray(v)[keep] for k, v in host["flip"].items()},
                             np.asarray(host["label"])[keep])
            count += int(keep.sum())
            shown.update(count)
    if writer is not None:
        writer.finish({"tokenizer": tok.name, "dataset": tok_data.to_dict()})
    multihost_utils.sync_global_devices("code_cache_written")
    logging.info("cached the %s codes of %d images (and their flips) in %s (%.0fs)", tok.name, count, out,
                 time.time() - t0)
    return out


# ----------------------------------------------------------------------------------------------- train

def train(config, workdir: str, callbacks: Sequence[Any] = (), stage: str = ""):
    """Train `config.family` in `workdir` (auto-resume); for a two-stage family, the tokenizer stage first (unless a
    finished or converted tokenizer is given). Every stage is checked before the first one starts (`preflight`).

    `callbacks`: objects with `on_step(trainer, step)` called after every step (tests use one to slow steps down).
    """
    from jaxgen.data import pipeline as data_pipeline
    from jaxgen.parallel import mesh as mesh_lib
    from jaxgen.train.trainer import Trainer

    workdir = os.path.abspath(workdir)
    stages = preflight.check(config, workdir, "train")
    family = families.build(config)
    save_config(config, workdir)
    n = len(stages)
    if n > 1:
        tok = stages[0]
        train(tok.config, tok.workdir, callbacks, stage=f"stage 1/{n} (tokenizer)")
    if family.cached:
        cache_codes(config, workdir, family)
    mesh = mesh_lib.make_mesh(config.mesh)
    trainer = Trainer(config, workdir, family=family, mesh=mesh, frozen=load_frozen(config, family, workdir, mesh),
                      stage=stage or (f"stage {n}/{n}" if n > 1 else ""))
    data_iter = data_pipeline.make_train_iterator(_resolved_data(config, workdir), family.batch_keys,
                                                  config.batch_size, seed=config.seed)
    on_sample = _periodic_sampler(config, workdir, family, trainer) if config.sample_every else None
    result = trainer.run(data_iter, on_sample=on_sample, callbacks=callbacks)
    if not result.stopped_by_signal and result.step >= config.total_steps:
        _export_final(trainer, config, workdir)
    trainer.close()
    return result


def _resolved_data(config, workdir):
    """What the generator stage reads: config.data, or with data.cache its code cache."""
    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    if data_cfg.cache:
        data_cfg.source, data_cfg.data_dir = "cached", cache_dir(config, workdir)
    return data_cfg


def _export_final(trainer, config, workdir):
    """A finished run also writes a params-only export (what a later stage or a sampler loads)."""
    state = trainer.state
    export.save_params(os.path.join(workdir, "export"), state.params, state.ema_params,
                       {"family": config.family, "step": int(jax.device_get(state.step))})


def _periodic_sampler(config, workdir, family, trainer):
    from jaxgen import sampling
    from jaxgen.utils.images import save_png

    # compiled at the first grid, reused after; the training steps' memory stays as it is
    sampler = sampling.Sampler(family, trainer.mesh, trainer.rules, hand_back_memory=False)

    def on_sample(trainer, step, logger):
        params = trainer.state.ema_params if (config.sample.use_ema and trainer.state.ema_params is not None) \
            else trainer.state.params
        per_class = max(1, min(config.sample.num_per_class, config.sample.grid_per_class))
        labels = sampling.class_labels(config.data.num_classes, per_class)
        images = sampler.generate(params, trainer.frozen, labels, config.seed + step,
                                  min(config.sample.batch_size, len(labels)), progress=False)
        grid = sampling.class_grid(images, labels, per_class)
        if jax.process_index() == 0:
            save_png(os.path.join(workdir, "samples", f"train_grid_{step:08d}.png"), grid)
        logger.image("samples", step, grid)

    return on_sample


# ----------------------------------------------------------------------------------------------- sample / eval

def abstract_frozen(family, mesh) -> dict:
    """ShapeDtypeStructs of `load_frozen`'s result (replicated on `mesh`), for compiling before loading."""
    if family.tokenizer is None:
        return {}
    rep = sh.replicated(mesh)
    return {"tokenizer": jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                                                restore.abstract_params(family.tokenizer))}


def load_for_sampling(config, workdir: str, mode: str = "sample", with_source: bool = False):
    """(family, params, frozen, mesh) of a run or of converted weights (`restore.load_params` order), after checking
    the run (`preflight`); `with_source`: also where the params came from (path and step). For 'sample' / 'eval'
    the sampler at config.sample.batch_size is compiled first, before any weights are in memory
    (`Sampler.precompile`): compile errors surface before minutes of loading, and the compiler's working memory is
    free by the time the weights arrive."""
    from jaxgen import sampling
    from jaxgen.parallel import mesh as mesh_lib

    preflight.check(config, workdir, mode)
    family = families.build(config)
    family.require_sampler()
    mesh = mesh_lib.make_mesh(config.mesh)
    if mode in ("sample", "eval"):
        sampling.Sampler(family, mesh, config.mesh.rules).precompile(
            restore.abstract_params(family, mesh, config.mesh.rules), abstract_frozen(family, mesh),
            config.sample.batch_size)
    params, where = restore.load_params(config, workdir, family, mesh, prefer_ema=config.sample.use_ema)
    frozen = load_frozen(config, family, workdir, mesh)
    release_free_memory()  # the loaders' temporaries, before the sampler's first call settles the peak
    return (family, params, frozen, mesh, where) if with_source else (family, params, frozen, mesh)


def _generate(config, workdir, mode):
    from jaxgen import sampling

    family, params, frozen, mesh = load_for_sampling(config, workdir, mode)
    labels = sampling.class_labels(config.data.num_classes, config.sample.num_per_class)
    images = sampling.Sampler(family, mesh, config.mesh.rules).generate(params, frozen, labels, config.seed,
                                                                         config.sample.batch_size)
    sampling.write_samples(os.path.join(workdir, "samples"), images, labels, config.sample.grid_per_class)
    return images, labels


def sample(config, workdir: str) -> str:
    images, labels = _generate(config, workdir, "sample")
    out = os.path.join(workdir, "samples")
    logging.info("wrote %s/samples.npz and grid.png", out)
    return out


def evaluate(config, workdir: str) -> dict:
    """FID / IS / precision-recall (eval.metric=inception) or the digit metric of N fresh samples, in resumable
    shards (jaxgen.eval.runner); writes <workdir>/eval.json."""
    from jaxgen.eval import runner

    return runner.evaluate(config, workdir)


def reference(config, workdir: str) -> dict:
    """Reference statistics of config.data for config.eval.metric -> <workdir>/reference_<split>.npz."""
    from jaxgen.eval import reference as reference_lib
    from jaxgen.eval import runner

    preflight.check_reference(config, workdir)
    if jax.process_index() != 0:  # one pass on one process (a single reader; launch it as one process)
        return {}
    extractor = runner.build_extractor(config, mesh=None)
    out = os.path.join(workdir, f"reference_{config.eval.reference_split}.npz")
    result = reference_lib.compute(config, out, extractor)
    logging.info("reference: %s (use it with --config.eval.reference=%s)", result, out)
    return result


def run(config, workdir: str, mode: str = "train", callbacks: Sequence[Any] = ()):
    if mode not in MODES:
        raise ConfigError(f"unknown --mode={mode}; use one of {', '.join(MODES)}")
    if mode == "train":
        return train(config, workdir, callbacks=callbacks)
    if mode == "sample":
        return sample(config, workdir)
    if mode == "eval":
        return evaluate(config, workdir)
    if mode == "reference":
        return reference(config, workdir)
    if mode == "search":
        from jaxgen.search import runner

        return runner.run(config, workdir)
    return cache_codes(config, workdir)
