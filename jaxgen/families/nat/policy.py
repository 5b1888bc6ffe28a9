"""Generation policies of parallel decoding: per-step tables, as AutoNAT searches them, or MaskGIT's schedules.

A policy for T steps is four float32 arrays of length T (`POLICY_KEYS`):
  mask_ratio[t]    fraction of the L tokens left masked after step t: mask_len = clamp(floor(L * ratio), 1,
                   masked_before - 1) (the last step's value is ignored: it re-masks nothing that is returned)
  remask_temp[t]   temperature of the Gumbel noise added to the confidences that choose what to re-mask
  sample_temp[t]   the categorical draw uses logits / max(sample_temp, 1e-4)
  guidance[t]      w of cond + w * (cond - uncond) (0 = purely conditional)

Config forms (config.sample):
  policy='tables'  AutoNAT's manual_ratios / manual_temp (T - 1 values: the last step has ratio 0 and temperature
                   0) and manual_samp_temp / manual_cfg (T values), as in its released strategy files
  policy='maskgit' MaskGIT: ratio_t = schedule((t + 1) / T) (clamped to [1e-6, 1]), remask_temp_t =
                   choice_temperature * (1 - (t + 1) / T), sample_temp 1, guidance 0
The values are traced inputs of the compiled sampler, so a policy search re-evaluates without recompiling.
"""
from __future__ import annotations

import math
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.sampling.schedules import check_schedule_name, mask_ratio

POLICY_KEYS = ("mask_ratio", "remask_temp", "sample_temp", "guidance")
MIN_SAMPLE_TEMP = 1e-4  # official max(samp_temp, 1e-4)

# AutoNAT-L's released T=8 strategy (configs/AutoNAT_L-T8_strategy.yaml).
AUTONAT_L_T8 = dict(
    mask_ratios=(0.9531645174140464, 0.8795409806037042, 0.7940230737075623, 0.745995860948045,
                 0.6249785820461957, 0.407321956652571, 0.260658917067054),
    remask_temps=(2.404912789740805, 2.477616274962803, 1.191696577294597, 0.7685444738649722,
                  1.0673489052089495, 0.9353720330515827, 0.7843839537838292),
    sample_temps=(2.8999037830310685, 1.867261830931786, 1.1443729673819831, 1.3796334226014182,
                  1.4699896959810144, 1.3760684112198358, 1.7082165405200722, 0.7133060703601533),
    guidance=(0.0001, 0.0001, 0.0001, 0.9151274967591447, 1.6160182878189675, 1.1945509026838659,
              1.38322370140345, 1.22678520936251),
)


def tables_policy(steps: int, mask_ratios, remask_temps, sample_temps, guidance) -> Dict[str, jax.Array]:
    """AutoNAT's manual_* lists (or traced arrays of those lengths) -> the four (T,) float32 arrays (the last step's
    ratio and re-mask temperature are 0)."""
    want = {"mask_ratios": (mask_ratios, steps - 1), "remask_temps": (remask_temps, steps - 1),
            "sample_temps": (sample_temps, steps), "guidance": (guidance, steps)}
    for name, (values, n) in want.items():
        if np.shape(values) != (n,):
            raise ValueError(f"config.sample.{name} has {np.size(values)} values; steps={steps} needs {n}")
    zero = jnp.zeros((1,), jnp.float32)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return {"mask_ratio": jnp.concatenate([f32(mask_ratios), zero]),
            "remask_temp": jnp.concatenate([f32(remask_temps), zero]),
            "sample_temp": f32(sample_temps), "guidance": f32(guidance)}


def maskgit_policy(steps: int, schedule: str, choice_temperature: float, seq_len: int) -> Dict[str, np.ndarray]:
    check_schedule_name(schedule)
    progress = (np.arange(steps, dtype=np.float32) + 1.0) / steps
    return {"mask_ratio": np.asarray(mask_ratio(schedule, progress, seq_len, clip=True), np.float32),
            "remask_temp": (choice_temperature * (1.0 - progress)).astype(np.float32),
            "sample_temp": np.ones(steps, np.float32), "guidance": np.zeros(steps, np.float32)}


def cosine_start(steps: int) -> Dict[str, list]:
    """AutoNAT's search starting point as manual_* lists: ratios cos(pi/2 k/T) (k = 1..T-1), re-mask temperatures
    1 - k/T (k = 0..T-2), sampling temperatures 1, guidance k/T (k = 1..T)."""
    k = np.linspace(0.0, 1.0, steps + 1)
    return {"mask_ratios": np.cos(k * math.pi / 2)[1:-1].tolist(), "remask_temps": (1.0 - k)[:-2].tolist(),
            "sample_temps": [1.0] * steps, "guidance": k[1:].tolist()}

