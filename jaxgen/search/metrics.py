"""What a policy search minimises: name -> (images uint8 NHWC, labels) -> float, lower is better.

digit_fd            Frechet distance of the digit classifier's features to the held-out digits (bundled data)
neg_class_consistency  -(fraction of samples the digit classifier assigns to their class)
A metric that needs reference statistics (FID on ImageNet) registers here with `register`.
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from jaxgen.errors import ConfigError

Metric = Callable[[np.ndarray, np.ndarray], float]
_METRICS: Dict[str, Callable[[], Metric]] = {}
DIGIT_METRICS = ("digit_fd", "neg_class_consistency")


def register(name: str, factory: Callable[[], Metric]) -> None:
    """`factory()` builds the metric once (loads classifiers / statistics)."""
    _METRICS[name] = factory


def names():
    return sorted(_METRICS)


def build(name: str) -> Metric:
    if name not in _METRICS:
        raise ConfigError(f"unknown search metric {name!r}; use one of {', '.join(names())}")
    return _METRICS[name]()


def _digit(which: str) -> Callable[[], Metric]:
    def factory() -> Metric:
        from jaxgen.eval.digit_metric import DigitMetric

        metric = DigitMetric.load_or_train()
        if which == "digit_fd":
            return lambda images, labels: float(metric.digit_fd(images))
        return lambda images, labels: -float(metric.class_consistency(images, labels))
    return factory


for _name in DIGIT_METRICS:
    register(_name, _digit(_name))
