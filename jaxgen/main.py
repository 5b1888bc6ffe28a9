"""python -m jaxgen.main --config=configs/<name>.py[:arg] --workdir=DIR [--mode=train|sample|eval|cache|search|reference]
    [--config.k=v] [--overrides=FILE.json]

Thin on purpose: flags, multi-process start-up, then `jaxgen.pipeline.run` (which checks the whole run first).
Bad input ends in ONE line `jaxgen: error: ...` and a non-zero exit; at the default verbosity nothing from the libraries
is printed (`--verbosity=1` shows their logs and warnings for debugging). Everything is importable.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples. Re-using it resumes.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "cache", "search", "reference"], "What to do.")
flags.DEFINE_string("overrides", None, "JSON file of {dotted config key: value} applied after --config.* (e.g. "
                    "the best_policy.json of --mode=search).")


def _fail(message: str, code: int = 2):
    sys.stderr.write(f"jaxgen: error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    os._exit(code)  # no atexit handlers: nothing half-finished gets written on the way out


def _root_cause(e: BaseException) -> BaseException:
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    return e


def _config_arg(argv):
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _parse(argv):
    spec = _config_arg(argv)
    if spec is not None:
        path = spec.split(":", 1)[0]
        if not os.path.isfile(path):
            _fail(f"config file {path} does not exist; pass one of configs/*.py, e.g. --config=configs/mar_tiny.py")
    try:
        return FLAGS(argv)
    except flags.Error as e:
        text = " ".join(str(e).split())
        if "config" in text and ("key" in text.lower() or "field" in text.lower() or "not" in text):
            text += " (check the key against the config file; only existing keys can be overridden)"
        _fail(text)
    except Exception as e:  # noqa: BLE001 - config files can raise anything: one line, no traceback
        _fail(f"cannot load the config {spec}: {_describe(_root_cause(e))}")


def _describe(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class _OnlyJaxgen(logging.Filter):
    """At the default verbosity: jaxgen's own lines only, none of the orbax / grain / jax / absl / tfds internals."""

    PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def filter(self, record):
        return os.path.abspath(record.pathname).startswith(self.PACKAGE)


def _quiet_libraries():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_OnlyJaxgen())


def main(argv, callbacks=()):
    del argv
    from jaxgen.errors import UserError

    if FLAGS.verbosity < 1:
        _quiet_libraries()
    try:
        config = FLAGS.config
    except Exception as e:  # noqa: BLE001 - config_flags defers a config file's own error to the first access
        _fail(f"cannot load the config: {_describe(_root_cause(e))}")
    if config is None:
        _fail("--config is required, e.g. --config=configs/mar_tiny.py")
    if not FLAGS.workdir:
        _fail("--workdir is required (where checkpoints, logs and samples go), e.g. --workdir=runs/mar_tiny")
    logging.getLogger().setLevel(logging.INFO)
    if FLAGS.overrides:
        from jaxgen import config as config_lib

        try:
            config_lib.apply_overrides(config, config_lib.load_overrides_file(FLAGS.overrides), FLAGS.overrides)
        except UserError as e:
            _fail(str(e))
    from jaxgen.utils.host_memory import keep_freed_memory

    keep_freed_memory()  # before jax starts its CPU thread pools (see the module)
    try:
        from jaxgen.parallel.mesh import maybe_initialize_distributed

        maybe_initialize_distributed()
        from jaxgen import pipeline

        pipeline.run(config, FLAGS.workdir, FLAGS.mode, callbacks=callbacks)
    except UserError as e:
        logging.shutdown()
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def entry(callbacks=()):
    """The CLI; `callbacks` (objects with `on_step(trainer, step)`) reach the trainer, for scripts wrapping it."""
    from jaxgen.utils.host_memory import restart_with_huge_pages

    restart_with_huge_pages()  # first: a re-exec (once) so glibc's allocator asks for 2 MB pages (see the module)
    app.run(functools.partial(main, callbacks=tuple(callbacks)), flags_parser=_parse)


if __name__ == "__main__":
    entry()
