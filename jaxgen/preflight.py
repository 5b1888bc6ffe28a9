"""Check a whole run before any stage trains, encodes or loads weights: the one-line error comes within seconds,
whichever stage it concerns (a tokenizer stage hours long must not run before a generator-stage typo is found).

    stages = preflight.check(config, workdir, mode)

Checked: the config builds strictly (every stage), dtype names, schedules and ratios; the mesh product equals the
device count; each stage's batch against its mesh, gradient accumulation and process count; the workdir is writable;
each stage's data is present and its first example decodes to the configured shape; the tokenizer source is present
(a converted checkpoint, a finished tokenizer run, or training it is allowed); for sampling, weights exist.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import List

from jaxgen import families
from jaxgen.errors import CheckpointError, ConfigError, DataError
from jaxgen.train import export, restore

SOURCES = ("digits", "tfds", "imagefolder")


@dataclass
class Stage:
    """One training run of the pipeline: the tokenizer stage (when it must be trained) or the generator."""
    name: str  # "tokenizer" | "generator"
    config: object
    workdir: str


def check(config, workdir: str, mode: str) -> List[Stage]:
    """Raise the first UserError of the run; return the training stages `mode=train` will run, in order."""
    from jaxgen import pipeline

    if mode in ("train", "cache") or os.path.isdir(workdir):
        _check_writable(workdir)
    family = families.build(config)
    if mode in ("sample", "eval", "search"):  # the generator's own weights first, then its tokenizer's
        family.require_sampler()
        _check_values(config)
        if mode == "search":
            from jaxgen.search import runner

            runner.check(config, family, workdir)
        if mode == "eval":
            from jaxgen.eval import runner as eval_runner

            eval_runner.check(config)
        restore.find_source(config, workdir)
    if mode == "train":
        generator = Stage("generator", config, os.path.abspath(workdir))
        _check_stage(generator, family)
        if not (family.cached and _cache_ready(config, workdir, family)):
            _check_data(config.data)  # the dataset of every stage (a tokenizer stage reads the same one)
    stages: List[Stage] = []
    if family.tokenizer is not None:
        tok_cfg = families.tokenizer_run_config(config)
        tok_dir = pipeline.tokenizer_source(config, workdir)  # raises when an explicit checkpoint is missing
        if config.tokenizer.get("checkpoint", ""):
            _check_params_dir(tok_dir, family.tokenizer.name, "config.tokenizer.checkpoint")
        elif restore.export_dir(tok_dir) is None:
            if mode != "train":
                raise CheckpointError(f"no trained tokenizer found at {tok_dir}; run --mode=train first (it trains "
                                      f"one) or set config.tokenizer.checkpoint to a converted tokenizer")
            if not config.tokenizer.get("allow_training", True):
                raise ConfigError(_official_tokenizer_hint(config, family.tokenizer))
            _check_writable(tok_dir)
            stage = Stage("tokenizer", tok_cfg, tok_dir)
            _check_stage(stage, family.tokenizer)
            if tok_cfg.data.to_dict() != config.data.to_dict():
                _check_data(tok_cfg.data)
            stages.append(stage)
    if mode == "train":
        stages.append(generator)
    elif mode == "cache":
        if family.tokenizer is None:
            raise ConfigError(f"family {config.family} has no tokenizer, so there is nothing to cache; "
                              "use --mode=train")
        _check_data(families.tokenizer_run_config(config).data)
    return stages


def check_reference(config, workdir: str) -> None:
    """--mode=reference: the metric's weights and the data split, before any feature is computed."""
    from jaxgen.eval import runner as eval_runner

    _check_writable(workdir)
    eval_runner.check_values(config)
    if config.eval.metric == "inception" and not os.path.isfile(config.eval.inception_weights or ""):
        raise ConfigError(f"config.eval.inception_weights={config.eval.inception_weights!r} is not a file: pass "
                          "pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    if config.data.source != "digits":
        _check_data(_split_of(config.data, config.eval.reference_split))


def _split_of(data_cfg, split: str):
    out = data_cfg.copy_and_resolve_references()
    out.split = split
    return out


def _check_stage(stage: Stage, family) -> None:
    """Values, mesh, batch split and optimizer of one training stage (its data is checked by the caller)."""
    from jaxgen.parallel import mesh as mesh_lib
    from jaxgen.parallel import sharding as sh
    from jaxgen.train.trainer import validate_batch

    config = stage.config
    where = "config.tokenizer.config" if stage.name == "tokenizer" else "config"
    _check_values(config, where)
    mesh = mesh_lib.make_mesh(config.mesh, log=False)
    validate_batch(config, mesh, sh.rules_tuple(config.mesh.rules), where=where)
    restore.make_optimizer(config, family)  # schedule and optimizer names, without allocating anything


def _check_values(config, where: str = "config") -> None:
    def need(ok, key, text):
        if not ok:
            raise ConfigError(f"{where}.{key}={config_value(key)!r} {text}")

    def config_value(key):
        node = config
        for part in key.split("."):
            node = node[part]
        return node

    need(config.total_steps >= 1, "total_steps", "must be >= 1")
    need(config.log_every >= 1, "log_every", "must be >= 1")
    need(config.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end)")
    need(config.sample_every >= 0, "sample_every", "must be >= 0 (0: never)")
    need(config.optim.lr >= 0 and config.optim.blr >= 0, "optim.lr", "and optim.blr must be >= 0")
    need(0.0 <= config.optim.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
    need(0.0 <= config.optim.warmup_init <= 1.0, "optim.warmup_init", "must be in [0, 1] (a fraction of the peak)")
    need(config.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(config.data.source in SOURCES, "data.source", f"is not one of {', '.join(SOURCES)}")
    need(config.sample.num_per_class >= 1 and config.sample.batch_size >= 1, "sample.batch_size",
         "and sample.num_per_class must be >= 1")


def _check_data(data_cfg) -> None:
    """The dataset is present and its first example decodes to the configured image shape."""
    from jaxgen.data import pipeline as data_pipeline

    data_pipeline.check_source(data_cfg, data_pipeline.build_source(data_cfg), ("image", "label"))


def _cache_ready(config, workdir: str, family) -> bool:
    """With data.cache: True when the cache exists (it must hold this tokenizer's keys); False when it will be written."""
    from jaxgen import pipeline
    from jaxgen.data import sources

    cache = pipeline.cache_dir(config, workdir)
    if not sources.code_cache_exists(cache):
        _check_writable(cache)
        return False
    keys = set(sources.read_code_cache_meta(cache)["keys"])
    if keys != set(family.tokenizer.cache_keys):
        raise DataError(f"the code cache in {cache} holds {sorted(keys)}, not the {family.tokenizer.name} "
                        f"tokenizer's {sorted(family.tokenizer.cache_keys)}: set data.cache_dir to another folder")
    return True


def _check_params_dir(path: str, family_name: str, key: str) -> None:
    if restore.export_dir(path) is None:
        raise CheckpointError(f"{key}={path} is not a jaxgen params checkpoint (no params/ and {export.META}); "
                              f"convert official weights with `python -m jaxgen.convert` or give a finished run's "
                              f"workdir")
    meta = export.load_meta(restore.export_dir(path))
    found = meta.get("family")
    if found and found != family_name:
        raise CheckpointError(f"{key}={path} holds {found!r} weights, but this run's tokenizer is {family_name!r}; "
                              f"point it at a converted {family_name} checkpoint")


def _official_tokenizer_hint(config, tokenizer) -> str:
    weights, tok_config = tokenizer.official_weights or ("<official tokenizer weights>", "configs/<tokenizer>.py")
    return (f"this config runs on the official {tokenizer.name} tokenizer, as the paper did: convert it with "
            f"`python -m jaxgen.convert --family={tokenizer.name} --config={tok_config} --input={weights} "
            f"--output=weights/{tokenizer.name}` and pass --config.tokenizer.checkpoint=weights/{tokenizer.name} "
            f"(or add the :train_tokenizer variant to train one from scratch)")


def _check_writable(directory: str) -> None:
    directory = os.path.abspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".jaxgen_write_test_{uuid.uuid4().hex}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"workdir {directory} is not writable ({e.strerror or e}); pass a --workdir you can "
                          f"write to") from None
