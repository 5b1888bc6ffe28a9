"""Image helpers: float [-1, 1] <-> uint8, grids, PNG writing."""
from __future__ import annotations

import os

import numpy as np


def to_uint8(images) -> np.ndarray:
    """float images in [-1, 1] (NHWC) -> uint8 in [0, 255] with the usual round-half-up of (x+1)*127.5."""
    x = np.asarray(images, np.float32)
    return np.clip(np.floor((x + 1.0) * 127.5 + 0.5), 0, 255).astype(np.uint8)


def make_grid(images_uint8: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H', cols*W', 3) uint8 grid (grayscale repeated to RGB)."""
    x = np.asarray(images_uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    n, h, w, c = x.shape
    rows = max(1, min(rows, n))
    cols = -(-n // rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return grid


def save_png(path: str, image_uint8: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img = np.asarray(image_uint8)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    Image.fromarray(img).save(path)
