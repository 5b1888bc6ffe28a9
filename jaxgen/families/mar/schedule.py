"""MAR's cosine mask schedule (official `MAR.sample_tokens`), as static numpy arrays.

The number of tokens unmasked at each step depends only on (seq_len, num_iter), so a sampler can use
these as constants and keep every shape static.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np


def mar_mask_schedule(seq_len: int, num_iter: int) -> Tuple[np.ndarray, np.ndarray]:
    """-> (mask_len[num_iter], num_predicted[num_iter]), int64.

    mask_len[k]: the official `mask_len` after step k = max(1, min(masked_before - 1, floor(seq_len *
    cos(pi/2 * (k+1)/num_iter)))), i.e. tokens left masked after step k (the last step's value, 1, is what
    the official passes to mask_by_order even though that step predicts everything).
    num_predicted[k]: tokens predicted at step k = masked_before - mask_len[k]; the last step predicts all
    still-masked tokens.
    """
    if seq_len < 1 or num_iter < 1:
        raise ValueError(f"seq_len and num_iter must be >= 1, got {seq_len}, {num_iter}")
    mask_len = np.zeros(num_iter, np.int64)
    num_pred = np.zeros(num_iter, np.int64)
    masked = seq_len
    for step in range(num_iter):
        ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)  # float64 numpy, as the official
        length = int(max(1, min(masked - 1, np.floor(seq_len * ratio))))
        mask_len[step] = length
        if step >= num_iter - 1:
            num_pred[step] = masked
            masked = 0
        else:
            num_pred[step] = masked - length
            masked = length
    return mask_len, num_pred
