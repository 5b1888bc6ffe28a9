"""Mask schedules of the masked / parallel decoders, as static numpy arrays or traced ratios.

How many tokens stay masked after each step depends only on (seq_len, num_steps), so samplers take these as
constants and keep every shape static.
"""
from __future__ import annotations

import math
from typing import Tuple

import jax.numpy as jnp
import numpy as np


def mar_mask_schedule(seq_len: int, num_iter: int) -> Tuple[np.ndarray, np.ndarray]:
    """MAR's cosine schedule (official `MAR.sample_tokens`) -> (mask_len[num_iter], num_predicted[num_iter]), int64.

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


# Mask-ratio functions of the decoding progress r in [0, 1] (MaskGIT libml/mask_schedule.py): the fraction of tokens
# still masked; n = the number of tokens that can be masked (log / exp use it). r may be a traced value.
MASK_RATIO_FNS = {
    "cosine": lambda r, n: jnp.cos(jnp.pi / 2.0 * r),
    "linear": lambda r, n: 1.0 - r,
    "uniform": lambda r, n: 1.0 - r,  # MaskGIT's name for linear
    "log": lambda r, n: -jnp.log2(r) / jnp.log2(n),
    "exp": lambda r, n: 1.0 - jnp.exp2(-jnp.log2(n) * (1.0 - r)),
}
SCHEDULE_NAMES = tuple(sorted(MASK_RATIO_FNS)) + ("pow<k>",)


def check_schedule_name(name: str) -> None:
    if not (name in MASK_RATIO_FNS or (name.startswith("pow") and name[3:].replace(".", "", 1).isdigit())):
        raise ValueError(f"unknown mask schedule {name!r}; use one of {', '.join(SCHEDULE_NAMES)}")


def mask_ratio(name: str, progress, num_tokens: int = 256, clip: bool = False):
    """Fraction still masked at `progress` in [0, 1] under the named MaskGIT schedule ('pow<k>' for 1 - r^k).
    `clip`: MaskGIT's clamp to [1e-6, 1] (what its decoder and training use)."""
    check_schedule_name(name)
    r = jnp.asarray(progress, jnp.float32)
    n = jnp.asarray(float(num_tokens), jnp.float32)
    if name.startswith("pow") and name not in MASK_RATIO_FNS:
        ratio = 1.0 - r ** float(name[3:])
    else:
        ratio = MASK_RATIO_FNS[name](r, n)
    return jnp.clip(ratio, 1e-6, 1.0) if clip else ratio
