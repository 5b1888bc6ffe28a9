"""The embedded digit metric (issue 2, item 9): real digits score high class consistency and a small digit_fd,
noise scores low consistency and a large distance. The classifier trains once and is cached under $JAXGEN_CACHE
(tests: .pytest_cache/jaxgen, shared with the CLI tests)."""
import os

import numpy as np
import pytest

from jaxgen.data.digits import NUM_CLASSES, TRAIN_PER_CLASS, load_digits
from jaxgen.errors import DataError
from jaxgen.eval.digit_metric import DigitMetric
from jaxgen.eval.metrics import frechet_distance
from tests.cli_utils import env


@pytest.fixture(scope="module")
def metric():
    return DigitMetric.load_or_train(directory=env()["JAXGEN_CACHE"])


def _real_digits(per_class=50):
    """Train digits NOT among the 50-per-class rows the real-vs-real reference uses, 'per_class' of each class."""
    images, labels = load_digits("train")
    rows = np.concatenate([np.arange(c * TRAIN_PER_CLASS + TRAIN_PER_CLASS - per_class, (c + 1) * TRAIN_PER_CLASS)
                           for c in range(NUM_CLASSES)])
    return images[rows], labels[rows]


def test_real_digits_score_well(metric):
    images, labels = _real_digits()
    assert np.all(labels == np.repeat(np.arange(NUM_CLASSES), 50))
    out = metric.evaluate(images, labels)
    assert out["num_samples"] == 500
    assert out["class_consistency"] > 0.95, out
    assert out["classifier_test_accuracy"] > 0.95, out
    # Held-out real digits sit at the real-vs-real floor (~5 for this classifier; noise is ~100x that).
    assert 0 <= out["digit_fd"] < 3.0 * out["real_vs_real_fd"] + 1.0, out
    # Wrong labels: same images, so the same distance, but the consistency collapses.
    shifted = metric.class_consistency(images, (labels + 1) % NUM_CLASSES)
    assert shifted < 0.05
    assert metric.digit_fd(images) == pytest.approx(out["digit_fd"])


def test_noise_scores_badly(metric):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (500, 32, 32, 1), dtype=np.uint8)
    labels = np.repeat(np.arange(NUM_CLASSES), 50)
    out = metric.evaluate(images, labels)
    real_fd = metric.digit_fd(_real_digits()[0])
    assert out["class_consistency"] < 0.3, out
    assert out["digit_fd"] > 20.0 * max(real_fd, out["real_vs_real_fd"]), (out, real_fd)
    blank = metric.digit_fd(np.zeros((100, 32, 32, 1), np.uint8))
    assert blank > 20.0 * out["real_vs_real_fd"]


def test_classifier_is_cached_and_reloaded(metric):
    path = os.path.join(env()["JAXGEN_CACHE"], "digit_metric")
    assert any(f.endswith(".npz") for f in os.listdir(path))
    again = DigitMetric.load_or_train(directory=env()["JAXGEN_CACHE"])
    images, _ = _real_digits(5)
    np.testing.assert_array_equal(again.predict(images), metric.predict(images))
    assert again.test_accuracy == pytest.approx(metric.test_accuracy)


def test_frechet_distance_and_input_checks(metric):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((400, 3))
    cov = np.cov(a, rowvar=False)
    assert frechet_distance(a.mean(0), cov, a.mean(0), cov) == pytest.approx(0.0, abs=1e-9)
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2.
    expect = 3 * 2.0 ** 2 + 3 * (np.sqrt(4.0) - 1.0) ** 2
    assert frechet_distance(np.zeros(3), 4 * np.eye(3), 2 * np.ones(3), np.eye(3)) == pytest.approx(expect)
    with pytest.raises(DataError, match="uint8"):
        metric.digit_fd(np.zeros((4, 32, 32, 1), np.float32))
    with pytest.raises(DataError, match="labels"):
        metric.class_consistency(np.zeros((4, 32, 32, 1), np.uint8), np.zeros(3))


def test_processes_starting_together_train_the_classifier_once(tmp_path, monkeypatch):
    """First uses at the same time (two eval processes, two test workers) wait for one training, not run two."""
    import threading
    import time

    import flax.linen as nn
    import jax

    from jaxgen.eval import digit_metric

    trained = []

    def slow_untrained_classifier():
        trained.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other caller to arrive while this one trains
        return nn.unbox(digit_metric._MODEL.init(jax.random.PRNGKey(0), load_digits("test")[0][:1])["params"])

    monkeypatch.setattr(digit_metric, "train_classifier", slow_untrained_classifier)
    metrics = []
    callers = [threading.Thread(target=lambda: metrics.append(DigitMetric.load_or_train(str(tmp_path))))
               for _ in range(2)]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    assert len(trained) == 1 and len(metrics) == 2
    assert metrics[0].test_accuracy == metrics[1].test_accuracy
    assert os.path.isfile(tmp_path / "digit_metric" / f"{digit_metric.VERSION}.npz")
