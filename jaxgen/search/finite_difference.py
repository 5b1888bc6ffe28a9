"""AutoNAT's generation-policy optimiser (LeapLabTHU/ImprovedNAT train.py `DisPatcher`), any numeric knobs.

theta = the searched values, flattened; each entry belongs to a group with (delta, lr, lo, hi). One update:
  base   = f(theta)                       (known from the previous update)
  f_i    = f(theta + delta_i e_i), the perturbed entry clamped to [lo, hi + delta] (official: ratios to [0, 1])
  g_i    = (f_i - base) / (perturbed_i - theta_i)     (0 when the clamp left no step)
  [g clipped to +-grad_clip when set]
  buf    = g on the first update, else momentum * buf + g      (torch SGD)
  theta  = clamp(theta - lr_i * buf, lo, hi); base = f(theta)
So an update costs len(theta) + 1 evaluations. The state is plain JSON (`to_json` / `from_json`); evaluations already
done inside an update are kept in `pending`, so a resumed search re-runs none of them and, with deterministic
evaluations, ends exactly where an uninterrupted one does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Group:
    delta: float
    lr: float
    lo: float
    hi: float

    def __post_init__(self):
        if not self.delta > 0 or not self.lr >= 0 or not self.lo < self.hi:
            raise ValueError(f"search group needs delta > 0, lr >= 0 and lo < hi, got {self}")


# The official values: mask ratios (delta 0.01, lr 1e-3, [0, 0.99]); temperatures and guidance (delta 0.1, lr 0.1, >= 1e-4).
DEFAULT_GROUPS = {"ratio": Group(0.01, 1e-3, 0.0, 0.99), "scale": Group(0.1, 0.1, 1e-4, math.inf)}


@dataclasses.dataclass
class Knob:
    """One searched config.sample value: its key, shape (() for a scalar) and group name."""
    key: str
    shape: Tuple[int, ...]
    group: str

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def flatten(knobs: Sequence[Knob], values: Dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(values[k.key], np.float64).reshape(-1) for k in knobs])


def unflatten(knobs: Sequence[Knob], theta: np.ndarray) -> Dict[str, np.ndarray]:
    out, i = {}, 0
    for k in knobs:
        out[k.key] = np.asarray(theta[i:i + k.size], np.float64).reshape(k.shape)
        i += k.size
    return out


@dataclasses.dataclass
class SearchState:
    theta: List[float]
    buf: Optional[List[float]] = None
    update: int = 0
    base: Optional[float] = None
    pending: Dict[str, float] = dataclasses.field(default_factory=dict)  # perturbation index -> metric
    history: List[dict] = dataclasses.field(default_factory=list)  # {update, metric, theta}
    evaluations: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "SearchState":
        return cls(**d)

    def best(self) -> dict:
        return min(self.history, key=lambda h: h["metric"])


class FiniteDifferenceSearch:
    """Drives `SearchState` with an evaluation function f(theta) -> float (lower is better).

    `save(state)` is called after every evaluation (checkpointing); `log(text)` reports progress."""

    def __init__(self, knobs: Sequence[Knob], groups: Dict[str, Group], momentum: float = 0.5,
                 grad_clip: float = 0.0):
        missing = sorted({k.group for k in knobs} - set(groups))
        if missing:
            raise ValueError(f"no search group settings for {missing}")
        self.knobs = list(knobs)
        self.momentum, self.grad_clip = float(momentum), float(grad_clip)
        per = [groups[k.group] for k in self.knobs for _ in range(k.size)]
        self.delta = np.array([g.delta for g in per])
        self.lr = np.array([g.lr for g in per])
        self.lo = np.array([g.lo for g in per])
        self.hi = np.array([g.hi for g in per])

    def initial_state(self, values: Dict[str, np.ndarray]) -> SearchState:
        theta = np.clip(flatten(self.knobs, values), self.lo, self.hi)
        return SearchState(theta=theta.tolist())

    def perturbed(self, theta: np.ndarray, i: int) -> np.ndarray:
        p = theta.copy()
        p[i] = min(max(theta[i] + self.delta[i], self.lo[i]), self.hi[i] + self.delta[i])
        return p

    def run(self, state: SearchState, f: Callable[[np.ndarray], float], updates: int,
            save: Callable[[SearchState], None] = lambda s: None, log: Callable[[str], None] = lambda t: None
            ) -> SearchState:
        theta = np.asarray(state.theta, np.float64)
        if state.base is None:
            state.base = float(f(theta))
            state.evaluations += 1
            state.history.append({"update": 0, "metric": state.base, "theta": theta.tolist()})
            save(state)
            log(f"update 0: metric {state.base:.4f}")
        while state.update < updates:
            n = len(theta)
            grad = np.zeros(n)
            for i in range(n):
                p = self.perturbed(theta, i)
                if str(i) not in state.pending:
                    state.pending[str(i)] = float(f(p))
                    state.evaluations += 1
                    save(state)
                step = p[i] - theta[i]
                grad[i] = (state.pending[str(i)] - state.base) / step if step != 0 else 0.0
            if self.grad_clip > 0:
                grad = np.clip(grad, -self.grad_clip, self.grad_clip)
            buf = grad if state.buf is None else self.momentum * np.asarray(state.buf) + grad
            theta = np.clip(theta - self.lr * buf, self.lo, self.hi)
            base = float(f(theta))
            state.evaluations += 1
            state.update += 1
            state.theta, state.buf, state.base, state.pending = theta.tolist(), buf.tolist(), base, {}
            state.history.append({"update": state.update, "metric": base, "theta": theta.tolist()})
            save(state)
            log(f"update {state.update}/{updates}: metric {base:.4f} (best {state.best()['metric']:.4f} at update "
                f"{state.best()['update']})")
        return state
