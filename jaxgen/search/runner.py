"""`--mode=search`: finite-difference policy search on a trained model (any family with a `search_space`).

    python -m jaxgen.main --config=configs/nat_tiny.py --workdir=runs/nat_tiny --mode=search
    python -m jaxgen.main --config=configs/nat_tiny.py --workdir=runs/nat_tiny --mode=eval \
        --overrides=runs/nat_tiny/search/best_policy.json

Every evaluation samples the same class-balanced labels with the same seed (config.search.seed), so metric
differences come from the policy, not from sampling noise; the knobs enter the compiled sampler as traced arrays
(`family.sample_with_policy`), so all evaluations share one compilation. <workdir>/search/ holds state.json (written
atomically after every evaluation: `kill -9` loses at most the evaluation in flight and a rerun resumes exactly),
history.csv, and best_policy.json ({"sample.<key>": value} of the best evaluated policy).
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

from jaxgen.errors import ConfigError
from jaxgen.search import metrics
from jaxgen.search.finite_difference import FiniteDifferenceSearch, Group, Knob, SearchState, unflatten


def knobs_of(config, family):
    """The searched knobs (config.search.knobs or the family's whole search_space) with their current values."""
    space = family.search_space()
    if not space:
        raise ConfigError(f"family {family.name!r} has no searchable sampling knobs for this config")
    keys = list(config.search.knobs) or list(space)
    unknown = [k for k in keys if k not in space]
    if unknown:
        raise ConfigError(f"config.search.knobs {unknown} are not searchable for {family.name}; use some of "
                          f"{', '.join(space)}")
    values = {k: np.asarray(getattr(family.sample_settings, k), np.float64) for k in keys}
    return [Knob(k, values[k].shape, space[k]) for k in keys], values


def groups_of(config):
    return {name: Group(**dict(g)) for name, g in dict(config.search.groups).items()}


def check(config, family, workdir: str = "") -> None:
    """Everything --mode=search needs from the config, before weights load; a saved search in the workdir must
    have the same settings (it is resumed)."""
    s = config.search
    if s.target not in ("policy", "beta"):
        raise ConfigError(f"config.search.target must be 'policy' or 'beta', got {s.target!r}")
    if s.metric in metrics.DIGIT_METRICS and config.data.source != "digits":
        raise ConfigError(f"config.search.metric={s.metric!r} needs a model of the bundled digits "
                          f"(data.source='digits')")
    if s.metric not in metrics.names():
        raise ConfigError(f"unknown config.search.metric {s.metric!r}; use one of {', '.join(metrics.names())}")
    if s.metric == "fid":
        from jaxgen.eval import runner as eval_runner

        eval_runner.check_values(config)
        eval_runner.check_inception_files(config)
    if s.num_samples < int(config.data.num_classes) or s.updates < 0 or not 0 <= s.momentum < 1:
        raise ConfigError("config.search needs num_samples >= the number of classes, updates >= 0 and momentum in "
                          "[0, 1)")
    if s.target == "beta":
        from jaxgen.search import beta_line_search

        return beta_line_search.check(config)
    knobs, _ = knobs_of(config, family)
    try:
        FiniteDifferenceSearch(knobs, groups_of(config), s.momentum, s.grad_clip)
    except ValueError as e:
        raise ConfigError(f"config.search.groups: {e}") from None
    if workdir:
        _saved_state(config, knobs, workdir)


def _saved_state(config, knobs, workdir: str):
    """The SearchState saved in <workdir>/search (None if none); a different search setup there is an error."""
    path = os.path.join(workdir, "search", "state.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError:
        raise ConfigError(f"{path} is not readable JSON; delete it to start the search over") from None
    if saved.get("setup") != _setup(config, knobs):
        raise ConfigError(f"{path} is a search with other settings ({saved.get('setup')}); use another --workdir or "
                          f"delete {os.path.dirname(path)} to start over")
    return SearchState.from_json(saved["state"])


def _setup(config, knobs) -> dict:
    s = config.search
    return {"keys": [k.key for k in knobs], "metric": s.metric, "num_samples": int(s.num_samples),
            "seed": int(s.seed), "groups": {k: dict(v) for k, v in dict(s.groups).items()},
            "momentum": float(s.momentum), "grad_clip": float(s.grad_clip)}


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # a half-written file never replaces a good one


def policy_overrides(knobs, theta) -> dict:
    values = unflatten(knobs, np.asarray(theta))
    return {f"sample.{k}": (v.tolist() if v.ndim else float(v)) for k, v in values.items()}


def run(config, workdir: str) -> dict:
    from jaxgen import pipeline, sampling

    if config.search.target == "beta":
        from jaxgen.search import beta_line_search

        return beta_line_search.run(config, workdir)

    family, params, frozen, mesh = pipeline.load_for_sampling(config, workdir, "search")
    s = config.search
    knobs, values = knobs_of(config, family)
    fd = FiniteDifferenceSearch(knobs, groups_of(config), s.momentum, s.grad_clip)
    metric = metrics.build(s.metric, config, mesh)
    num_classes = int(config.data.num_classes)
    labels = sampling.class_labels(num_classes, max(1, int(s.num_samples) // num_classes))
    sampler = sampling.Sampler(family, mesh, config.mesh.rules)
    out = os.path.join(workdir, "search")
    os.makedirs(out, exist_ok=True)
    state_path = os.path.join(out, "state.json")
    setup = _setup(config, knobs)
    state = _saved_state(config, knobs, workdir)
    if state is not None:
        logging.info("search: resuming at update %d (%d evaluations done)", state.update, state.evaluations)
    else:
        state = fd.initial_state(values)
    host0 = jax.process_index() == 0
    per_update = sum(k.size for k in knobs) + 1
    t0, n0 = time.time(), state.evaluations

    def evaluate(theta):
        images = sampler.generate(params, frozen, labels, int(s.seed), config.sample.batch_size, progress=False,
                                  policy=unflatten(knobs, theta))
        value = metric(images, labels)
        done = state.evaluations + 1 - n0
        rate = done / max(time.time() - t0, 1e-9)
        left = (int(s.updates) - state.update) * per_update - len(state.pending) - 1 + (state.base is None)
        logging.info("[search] %s=%.4f | evaluation %d (%.2f s each, %d images) | ETA %.0f s", s.metric, value,
                     state.evaluations + 1, 1.0 / rate, len(labels), max(left, 0) / rate)
        return value

    def save(st):
        if host0:
            _write_json(state_path, {"setup": setup, "state": st.to_json()})
            best = st.best()
            _write_json(os.path.join(out, "best_policy.json"), policy_overrides(knobs, best["theta"]))
            with open(os.path.join(out, "history.csv.tmp"), "w") as f:
                f.write("update,metric," + ",".join(f"{k.key}[{i}]" for k in knobs for i in range(k.size)) + "\n")
                for h in st.history:
                    f.write(f"{h['update']},{h['metric']}," + ",".join(f"{v:.6g}" for v in h["theta"]) + "\n")
            os.replace(os.path.join(out, "history.csv.tmp"), os.path.join(out, "history.csv"))

    state = fd.run(state, evaluate, int(s.updates), save=save, log=lambda t: logging.info("search: %s", t))
    best = state.best()
    result = {"start": state.history[0]["metric"], "best": best["metric"], "best_update": best["update"],
              "updates": state.update, "evaluations": state.evaluations, "metric": s.metric,
              "best_policy": os.path.join(out, "best_policy.json")}
    logging.info("search: %s %.4f -> %.4f (update %d); wrote %s", s.metric, result["start"], result["best"],
                 result["best_update"], result["best_policy"])
    return result
