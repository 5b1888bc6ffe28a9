"""An embedded sample-quality metric for the bundled digits: needs no download and runs in seconds on a CPU.

A small CNN classifier is trained once on the digits 'train' split (about 10-30 s on 2 CPU cores) and cached
under `$JAXGEN_CACHE/digit_metric/<VERSION>.npz` (default `~/.cache/jaxgen`). It gives:
  class_consistency  fraction of class-conditional samples the classifier assigns to their label
  digit_fd           Fréchet distance of the classifier's penultimate features, samples vs the 500 held-out
                     'test' digits (the digits analogue of FID; lower is better)
  real_vs_real_fd    the same distance for 500 real 'train' digits: the floor a perfect generator reaches
"""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen.data.digits import IMAGE_SIZE, NUM_CLASSES, TRAIN_PER_CLASS, load_digits
from jaxgen.errors import DataError
from jaxgen.eval.metrics import feature_stats, frechet_distance
from jaxgen.nn.layers import Dense, with_axes

# Bump when the model or training recipe changes: old cached classifiers are then ignored.
VERSION = "digit-cnn-v2"
FEATURE_DIM = 128
_EVAL_BATCH = 250  # features are computed in fixed-size (padded) batches: one compilation
_TRAIN = dict(seed=0, epochs=8, batch_size=128, lr=2e-3, max_shift=2)


# ---------------------------------------------------------------------------------------------- model

class _Conv3x3(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", with_axes(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
                            (3, 3, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", with_axes(nn.initializers.zeros, ("conv_out",)), (self.features,), jnp.float32)
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


class DigitClassifier(nn.Module):
    """2 x (conv 3x3 + ReLU + 2x2 max-pool) -> dense 128 + ReLU (the features) -> 10 logits."""

    @nn.compact
    def __call__(self, images_uint8):
        x = images_uint8.astype(jnp.float32) / 255.0
        for i, width in enumerate((32, 64)):
            x = nn.relu(_Conv3x3(width, name=f"conv{i}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.relu(Dense(FEATURE_DIM, axes=("conv_out", "mlp"), name="hidden")(x))
        logits = Dense(NUM_CLASSES, axes=("mlp", "classes"), name="out")(features)
        return logits, features


_MODEL = DigitClassifier()


@jax.jit
def _apply(params, images):
    return _MODEL.apply({"params": params}, images)


# ---------------------------------------------------------------------------------------------- training

def _random_shift(images, rng, max_shift):
    """Translate each image by up to `max_shift` pixels (zero fill): makes the classifier robust to placement."""
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(rng, (n, 2), 0, 2 * max_shift + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


def train_classifier(seed: int = _TRAIN["seed"], epochs: int = _TRAIN["epochs"],
                     batch_size: int = _TRAIN["batch_size"], lr: float = _TRAIN["lr"],
                     max_shift: int = _TRAIN["max_shift"]) -> Dict[str, Any]:
    """Train the classifier on the digits 'train' split; returns plain (unboxed) params."""
    images, labels = load_digits("train")
    n = len(labels)
    steps_per_epoch = n // batch_size
    total = steps_per_epoch * epochs
    rng = jax.random.PRNGKey(seed)
    params = nn.unbox(_MODEL.init(rng, images[:1])["params"])
    tx = optax.adam(optax.cosine_decay_schedule(lr, total))
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        logits, _ = _MODEL.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y, key):
        grads = jax.grad(loss_fn)(p, _random_shift(x, key, max_shift), y)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s

    # A Python loop over one jitted step: XLA:CPU runs convolutions inside lax.scan / while bodies ~20x slower.
    np_rng = np.random.default_rng(seed)
    keys = jax.random.split(jax.random.fold_in(rng, 1), total)
    for epoch in range(epochs):
        order = np_rng.permutation(n)[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
        for i, idx in enumerate(order):
            params, opt_state = step(params, opt_state, images[idx], labels[idx], keys[epoch * steps_per_epoch + i])
    return jax.device_get(params)


# ---------------------------------------------------------------------------------------------- cache

def cache_dir() -> str:
    return os.environ.get("JAXGEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxgen")


@contextlib.contextmanager
def _exclusive(lock_path: str):
    """An exclusive advisory lock on `lock_path` for the block (POSIX flock; no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent trainers then each write a whole file (write-then-rename)
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        out.update(_flatten(v, path + "/") if isinstance(v, dict) else {path: np.asarray(v)})
    return out


def _unflatten(flat):
    tree: Dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(v)
    return tree


# ---------------------------------------------------------------------------------------------- metric

def _check_images(images, min_count: int = 1) -> np.ndarray:
    images = np.asarray(images)
    shape = (IMAGE_SIZE, IMAGE_SIZE, 1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape or len(images) < min_count:
        raise DataError(f"the digit metric needs uint8 images of shape (N>={min_count}, 32, 32, 1) (digits"
                        f" data); got {images.dtype} {images.shape}: convert samples with"
                        " round((x + 1) * 127.5) clipped to 0..255 and use it only for data.source=digits")
    return images


class DigitMetric:
    """Frozen digit classifier + reference statistics. Build with `DigitMetric.load_or_train()`."""

    def __init__(self, params, test_accuracy: Optional[float] = None):
        self.params = params
        self._test_images, self._test_labels = load_digits("test")
        self.test_accuracy = (self.class_consistency(self._test_images, self._test_labels)
                              if test_accuracy is None else float(test_accuracy))

    @classmethod
    def load_or_train(cls, directory: Optional[str] = None, verbose: bool = False) -> "DigitMetric":
        path = os.path.join(directory or cache_dir(), "digit_metric", f"{VERSION}.npz")
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # Processes that start together (the two of a localhost jax.distributed eval, parallel test workers)
            # wait for the first one's classifier instead of each training its own on the same cores.
            with _exclusive(path + ".lock"):
                if not os.path.isfile(path):
                    return cls._train_and_cache(path, verbose)
        with np.load(path) as data:
            flat = {k: data[k] for k in data.files if not k.startswith("__")}
            accuracy = float(data["__test_accuracy__"])
        return cls(_unflatten(flat), accuracy)

    @classmethod
    def _train_and_cache(cls, path: str, verbose: bool) -> "DigitMetric":
        start = time.time()
        params = train_classifier()
        metric = cls(params)
        # Write-then-rename: concurrent processes each produce a complete file, never a torn one.
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __test_accuracy__=np.float64(metric.test_accuracy), **_flatten(params))
        os.replace(tmp, path)
        if verbose:
            print(f"digit metric: trained classifier in {time.time() - start:.1f}s, test accuracy"
                  f" {metric.test_accuracy:.4f}, cached at {path}")
        return metric

    def _run(self, images):
        from jaxgen.eval.features import batched_apply

        out = batched_apply(lambda x: dict(zip(("logits", "features"), _apply(self.params, x))),
                            _check_images(images), _EVAL_BATCH)
        return out["logits"], out["features"]

    def logits_and_features(self, images):
        """(logits (N, 10), penultimate features (N, 128)) float32."""
        return self._run(images)

    def predict(self, images) -> np.ndarray:
        return self._run(images)[0].argmax(-1).astype(np.int32)

    def features(self, images) -> np.ndarray:
        """Penultimate-layer features (N, 128) float32."""
        return self._run(images)[1]

    def class_consistency(self, images, labels) -> float:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(np.asarray(images)):
            raise DataError(f"class_consistency got {len(np.asarray(images))} images but {len(labels)} labels")
        return float(np.mean(self.predict(images) == labels))

    @functools.cached_property
    def _test_stats(self):
        return feature_stats(self.features(self._test_images))

    def digit_fd(self, images) -> float:
        """Fréchet distance of `images`' features to the 500 held-out test digits (needs >= 2 images)."""
        return frechet_distance(*feature_stats(self.features(_check_images(images, 2))), *self._test_stats)

    @functools.cached_property
    def _real_vs_real(self) -> float:
        images, labels = load_digits("train")
        per_class = len(self._test_labels) // NUM_CLASSES
        keep = np.concatenate([np.arange(c * TRAIN_PER_CLASS, c * TRAIN_PER_CLASS + per_class)
                               for c in range(NUM_CLASSES)])
        assert np.all(labels[keep] == np.repeat(np.arange(NUM_CLASSES), per_class))
        return self.digit_fd(images[keep])

    def real_vs_real_fd(self) -> float:
        """digit_fd of 500 real train digits (50 per class): the value a perfect generator would score."""
        return self._real_vs_real

    def evaluate(self, images, labels) -> Dict[str, float]:
        images = _check_images(images, 2)
        return {
            "class_consistency": self.class_consistency(images, labels),
            "digit_fd": self.digit_fd(images),
            "real_vs_real_fd": self.real_vs_real_fd(),
            "classifier_test_accuracy": self.test_accuracy,
            "num_samples": int(len(images)),
        }
