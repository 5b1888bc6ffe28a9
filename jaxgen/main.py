"""python -m jaxgen.main --config=configs/<name>.py[:arg] --workdir=DIR [--mode=train|sample|eval|cache] [--config.k=v]

Thin on purpose: flags, multi-process start-up, then `jaxgen.pipeline.run`. Everything is importable.
"""
from __future__ import annotations

import functools
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples. Re-using it resumes.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "cache"], "What to do.")


def _fail(message: str, code: int = 2):
    sys.stderr.write(f"jaxgen: error: {message}\n")
    sys.stderr.flush()
    os._exit(code)  # no atexit handlers: nothing half-finished gets written on the way out


def _parse(argv):
    try:
        return FLAGS(argv)
    except flags.Error as e:
        text = " ".join(str(e).split())
        if "config" in text and ("key" in text.lower() or "field" in text.lower() or "not" in text):
            text += " (check the key against the config file; only existing keys can be overridden)"
        _fail(text)
    except Exception as e:  # noqa: BLE001 - config files can raise anything: one line, no traceback
        _fail(f"cannot load the config: {' '.join(str(e).split()) or type(e).__name__}")


class _QuietLibraries(logging.Filter):
    """Keep jaxgen's own progress lines; drop the INFO chatter of orbax / grain / jax / absl internals."""

    NOISY = ("/orbax/", "/grain/", "/jax/", "/jaxlib/", "/flax/", "/absl/", "/tensorflow_datasets/", "/etils/")

    def filter(self, record):
        return record.levelno >= logging.WARNING or not any(s in record.pathname for s in self.NOISY)


def main(argv, callbacks=()):
    del argv
    from jaxgen.errors import UserError

    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietLibraries())

    if FLAGS.config is None:
        _fail("--config is required, e.g. --config=configs/mar_tiny.py")
    if not FLAGS.workdir:
        _fail("--workdir is required (where checkpoints, logs and samples go), e.g. --workdir=runs/mar_tiny")
    logging.getLogger().setLevel(logging.INFO)
    try:
        from jaxgen.parallel.mesh import maybe_initialize_distributed

        maybe_initialize_distributed()
        from jaxgen import pipeline

        pipeline.run(FLAGS.config, FLAGS.workdir, FLAGS.mode, callbacks=callbacks)
    except UserError as e:
        logging.shutdown()
        _fail(" ".join(str(e).split()))
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def entry(callbacks=()):
    """The CLI; `callbacks` (objects with `on_step(trainer, step)`) reach the trainer, for scripts wrapping it."""
    app.run(functools.partial(main, callbacks=tuple(callbacks)), flags_parser=_parse)


if __name__ == "__main__":
    entry()
