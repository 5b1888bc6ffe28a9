"""What a policy search minimises: name -> (images uint8 NHWC, labels) -> float, lower is better.

digit_fd            Frechet distance of the digit classifier's features to the held-out digits (bundled data)
neg_class_consistency  -(fraction of samples the digit classifier assigns to their class)
fid                 FID of Inception-v3 pool3 features against config.eval.reference (config.eval.inception_weights),
                    the same extractor and statistics as --mode=eval
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from jaxgen.errors import ConfigError

Metric = Callable[[np.ndarray, np.ndarray], float]
_METRICS: Dict[str, Callable[..., Metric]] = {}
DIGIT_METRICS = ("digit_fd", "neg_class_consistency")


def register(name: str, factory: Callable[..., Metric]) -> None:
    """`factory(config, mesh)` builds the metric once (loads classifiers / statistics)."""
    _METRICS[name] = factory


def names():
    return sorted(_METRICS)


def build(name: str, config=None, mesh=None) -> Metric:
    if name not in _METRICS:
        raise ConfigError(f"unknown search metric {name!r}; use one of {', '.join(names())}")
    return _METRICS[name](config, mesh)


def _digit(which: str) -> Callable[..., Metric]:
    def factory(config=None, mesh=None) -> Metric:
        from jaxgen.eval.digit_metric import DigitMetric

        metric = DigitMetric.load_or_train()
        if which == "digit_fd":
            return lambda images, labels: float(metric.digit_fd(images))
        return lambda images, labels: -float(metric.class_consistency(images, labels))
    return factory


for _name in DIGIT_METRICS:
    register(_name, _digit(_name))


def _fid(config, mesh=None) -> Metric:
    from jaxgen.eval import reference
    from jaxgen.eval.features import InceptionExtractor
    from jaxgen.eval.metrics import feature_stats, frechet_distance

    if config is None:
        raise ConfigError("search metric 'fid' needs the run config (config.eval.inception_weights / reference)")
    extractor = InceptionExtractor(config.eval.inception_weights, config.eval.feature_batch, mesh, config.mesh.rules)
    ref = reference.load(config.eval.reference, extractor)
    return lambda images, labels: frechet_distance(*feature_stats(extractor(images)["pool"]), ref.mu, ref.sigma,
                                                   method=config.eval.fid_method)


register("fid", _fid)
