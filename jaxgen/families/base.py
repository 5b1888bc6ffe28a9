"""What a family supplies to the family-agnostic trainer, sampler and evaluator.

A family is a small object built from the full run config. The trainer only ever calls:

    fam = jaxgen.families.build(config)           # registry lookup on config.family
    boxed = fam.init(rng)                          # linen params WITH logical-axis boxes (nn.Partitioned)
    loss, metrics = fam.loss(params, batch, rng, frozen)       # inside the jitted train step
    images = fam.sample(params, frozen, labels, rng)           # inside jit; float32 NHWC in [-1, 1]
    mask = fam.weight_decay_mask(params)                       # pytree of bools, True = decay

`batch` is a dict of arrays whose keys are declared by `batch_keys` (e.g. {'image', 'label'} or
{'moments', 'label'}); `frozen` is a pytree of non-trained arrays the family needs (e.g. a tokenizer's
params), loaded by `load_frozen`. Shapes are static: every method must trace once per batch size.
"""
from __future__ import annotations

import abc
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections

from jaxgen.errors import ConfigError

Params = Any
Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]


class Family(abc.ABC):
    name: str = "?"
    # Keys the family's loss reads from a batch; the data pipeline is asked for exactly these.
    batch_keys: Tuple[str, ...] = ("image", "label")
    # Name of the tokenizer family this one runs on (None for pixel-space / tokenizer families).
    tokenizer: Optional[str] = None

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    @abc.abstractmethod
    def init(self, rng: jax.Array) -> Params:
        """Boxed params (logical partitioning metadata kept) for `jax.eval_shape` / sharded init."""

    @abc.abstractmethod
    def loss(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        """Scalar training loss and scalar metrics. Training mode (dropout etc. on)."""

    def sample(self, params: Params, frozen: Any, labels: jax.Array, rng: jax.Array) -> jax.Array:
        """Class-conditional samples as float32 NHWC images in [-1, 1] (settings from config.sample)."""
        raise self._no_sampler_error()

    @property
    def can_sample(self) -> bool:
        return type(self).sample is not Family.sample

    def require_sampler(self) -> None:
        """Raise the one-line ConfigError for a family that cannot generate (a tokenizer), before anything is loaded."""
        if not self.can_sample:
            raise self._no_sampler_error()

    def _no_sampler_error(self) -> ConfigError:
        return ConfigError(f"family {self.name!r} has no class-conditional sampler (a tokenizer reconstructs, it does "
                           "not generate): use --mode=sample / eval with a generator config such as "
                           "configs/mar_tiny.py or configs/var_tiny.py")

    def weight_decay_mask(self, params: Params) -> Any:
        """Default: decay every parameter with ndim >= 2 (biases, norms and other 1-D params excluded)."""
        return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

    def tokenizer_params(self, frozen: Any) -> Any:
        """The frozen tokenizer's params (the pipeline puts them in frozen['tokenizer'])."""
        if not isinstance(frozen, dict) or "tokenizer" not in frozen:
            raise ConfigError(f"{self.name} needs its tokenizer's params in frozen['tokenizer'] (the pipeline loads "
                              "them from the tokenizer run or config.tokenizer.checkpoint)")
        return frozen["tokenizer"]

    def load_frozen(self) -> Any:
        """Arrays the family needs but does not train (e.g. tokenizer params). Default: none."""
        return {}

    def dummy_batch(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one global batch (used to compile the step before any data arrives)."""
        raise NotImplementedError
