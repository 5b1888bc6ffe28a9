"""AutoNAT's training-side search: the mask-ratio distribution Beta(a, b) by greedy line search, one parameter at a
time, each candidate judged by a short training run (`config.search.train_steps`) and the metric of its samples
under the config's generation policy.

    python -m jaxgen.main --config=configs/nat_tiny.py --workdir=runs/nat_tiny --mode=search \
        --config.search.target=beta --config.search.train_steps=400

For each round and each parameter (beta_a, then beta_b): step by +beta_step while the metric improves; if the first
step up did not improve, step down instead. Candidates train from scratch in <workdir>/beta_search/a<A>_b<B>/ on the
run's own tokenizer and code cache (trained once by the main run); every finished candidate's metric is stored in
beta_search/results.json (atomically), so a rerun skips it and a candidate cut short resumes from its checkpoint.
The best (a, b) is written as beta_search/best_beta.json, an `--overrides` file for the full training run.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, Sequence, Tuple

import ml_collections

from jaxgen.errors import ConfigError


def _key(a: float, b: float) -> str:
    return f"a{a:g}_b{b:g}"


def check(config) -> None:
    if config.family != "nat" or config.loss.get("mask_distribution") != "beta":
        raise ConfigError("config.search.target='beta' searches NAT's Beta(a, b) mask-ratio distribution: it needs "
                          "family 'nat' with config.loss.mask_distribution='beta'")
    s = config.search
    if s.train_steps < 1 or not s.beta_step > 0 or s.beta_rounds < 1:
        raise ConfigError("config.search needs train_steps >= 1, beta_step > 0 and beta_rounds >= 1 for target='beta'")


def _trial_config(config, workdir: str, a: float, b: float) -> ml_collections.ConfigDict:
    from jaxgen import pipeline

    c = ml_collections.ConfigDict(config.to_dict())
    c.loss.beta_a, c.loss.beta_b = float(a), float(b)
    c.total_steps = int(config.search.train_steps)
    c.checkpoint_every = max(1, min(int(config.checkpoint_every), c.total_steps))
    c.sample_every = 0
    c.tokenizer.workdir = pipeline.tokenizer_workdir(config, workdir)  # the run's tokenizer, never retrained
    c.data.cache_dir = pipeline.cache_dir(config, workdir)
    c.lock()
    return c


def greedy_line_search(evaluate: Callable[..., float], start: Sequence[float], step: float, rounds: int
                       ) -> Tuple[Tuple[float, ...], float]:
    """Minimise evaluate(*x) over positive x, one coordinate at a time: from the current point step +step while it
    improves, else -step while it improves; `rounds` passes (fewer when a pass moves nothing)."""
    current = tuple(float(v) for v in start)
    best = evaluate(*current)
    for _ in range(rounds):
        moved = False
        for index in range(len(current)):
            for direction in (1.0, -1.0):
                improved = False
                while True:
                    cand = list(current)
                    cand[index] = round(cand[index] + direction * step, 6)
                    if cand[index] <= 0:
                        break
                    value = evaluate(*cand)
                    if value >= best:
                        break
                    current, best, improved, moved = tuple(cand), value, True, True
                if improved:
                    break  # this coordinate went up; do not also try down
        if not moved:
            break
    return current, best


def run(config, workdir: str) -> Dict[str, float]:
    from jaxgen import pipeline
    from jaxgen.search import metrics as metrics_lib
    from jaxgen.search.runner import _write_json

    check(config)
    s = config.search
    out = os.path.join(workdir, "beta_search")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    metric = metrics_lib.build(s.metric)
    shared = {}  # one Sampler for every candidate: the params are arguments, so it compiles once

    def evaluate(a: float, b: float) -> float:
        key = _key(a, b)
        if key in results:
            return results[key]
        trial_dir = os.path.join(out, key)
        trial = _trial_config(config, workdir, a, b)
        logging.info("beta search: training Beta(%g, %g) for %d steps in %s", a, b, trial.total_steps, trial_dir)
        pipeline.train(trial, trial_dir)
        from jaxgen import sampling

        family, params, frozen, mesh = pipeline.load_for_sampling(trial, trial_dir, "sample")
        labels = sampling.class_labels(int(config.data.num_classes),
                                       max(1, int(s.num_samples) // int(config.data.num_classes)))
        if "sampler" not in shared:
            shared["sampler"] = sampling.Sampler(family, mesh, config.mesh.rules)
        images = shared["sampler"].generate(params, frozen, labels, int(s.seed), config.sample.batch_size,
                                            progress=False)
        results[key] = float(metric(images, labels))
        _write_json(path, results)
        logging.info("beta search: Beta(%g, %g): %s = %.4f", a, b, s.metric, results[key])
        return results[key]

    current, best = greedy_line_search(evaluate, (float(config.loss.beta_a or 12.0),
                                                  float(config.loss.beta_b or 3.0)), float(s.beta_step),
                                       int(s.beta_rounds))
    _write_json(os.path.join(out, "best_beta.json"), {"loss.beta_a": current[0], "loss.beta_b": current[1]})
    logging.info("beta search: best Beta(%g, %g) with %s %.4f (%d candidates trained); wrote %s", current[0],
                 current[1], s.metric, best, len(results), os.path.join(out, "best_beta.json"))
    return {"beta_a": current[0], "beta_b": current[1], "metric": best, "candidates": len(results)}
