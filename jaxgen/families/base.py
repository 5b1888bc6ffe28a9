"""What a family supplies to the family-agnostic trainer, sampler and evaluator, and what a tokenizer adds.

A family is a small object built from the full run config. The trainer only ever calls:

    fam = jaxgen.families.build(config)           # registry lookup on config.family
    boxed = fam.init(rng)                          # linen params WITH logical-axis boxes (nn.Partitioned)
    loss, metrics = fam.loss(params, batch, rng, frozen)       # inside the jitted train step
    images = fam.sample(params, frozen, labels, rng)           # inside jit; float32 NHWC in [-1, 1]
    mask = fam.weight_decay_mask(params)                       # pytree of bools, True = decay

`batch` is a dict of arrays whose keys are `batch_keys` (images, or with data.cache the tokenizer's `cache_keys`); `frozen` is a pytree of non-trained arrays (a generator's tokenizer params in frozen['tokenizer']).
Shapes are static: every method must trace once per batch size.

Configuration is strict: `config.model` builds the family's module (`jaxgen.strict.build`), `config.loss` and the
family keys of `config.sample` build its `LossSettings` / `SampleSettings` dataclasses; a key nobody takes is an error.
"""
from __future__ import annotations

import abc
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from jaxgen import strict
from jaxgen.errors import ConfigError

Params = Any
Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]

# config.sample keys the family-agnostic sampling code reads; every other key belongs to the family's SampleSettings.
GENERIC_SAMPLE_KEYS = ("num_per_class", "batch_size", "use_ema", "grid_per_class")
# Top-level model knobs; a family lists the ones its modules implement in `supports`, the others must stay off.
_KNOB_OFF = {"remat": False, "scan_layers": False, "attention_impl": "auto"}


class Family(abc.ABC):
    name: str = "?"
    # Tokenizer families this generator can run on (config.tokenizer.config.family); () = needs no tokenizer.
    tokenizer_families: Tuple[str, ...] = ()
    LossSettings: type = strict.NoSettings
    SampleSettings: type = strict.NoSettings
    supports: Tuple[str, ...] = ()  # of "remat", "scan_layers", "attention_impl"

    def __init__(self, config: ml_collections.ConfigDict):
        from jaxgen.families import build_tokenizer  # the registry imports this module

        self.config = config
        self.dtype = _dtype(config, "compute_dtype")
        self.param_dtype = _dtype(config, "param_dtype")
        for knob, off in _KNOB_OFF.items():
            if knob not in self.supports and config.get(knob, off) != off:
                raise ConfigError(f"family {self.name!r} does not implement {knob}={config.get(knob)!r}; "
                                  f"leave config.{knob} at {off!r}")
        self.loss_settings = strict.build(self.LossSettings, config.get("loss"), "config.loss")
        family_sample = {k: v for k, v in dict(config.get("sample") or {}).items() if k not in GENERIC_SAMPLE_KEYS}
        self.sample_settings = strict.build(self.SampleSettings, family_sample, "config.sample")
        self.tokenizer: Optional["Tokenizer"] = build_tokenizer(config) if self.tokenizer_families else None

    # --- data ----------------------------------------------------------------------------------------------------
    @property
    def cached(self) -> bool:
        """Batches hold the tokenizer's cached codes (`--mode=cache`) instead of images."""
        return bool(self.config.data.get("cache", False))

    @property
    def batch_keys(self) -> Tuple[str, ...]:
        if self.cached:
            if self.tokenizer is None:
                raise ConfigError(f"data.cache=True needs a tokenizer, and family {self.name!r} has none; "
                                  "set --config.data.cache=False")
            return tuple(self.tokenizer.cache_keys) + ("label",)
        return ("image", "label")

    def image_shape(self) -> Tuple[int, int, int]:
        d = self.config.data
        return int(d.image_size), int(d.image_size), int(d.channels)

    def dummy_batch(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
        """Shapes of one global batch (used to compile the step before any data arrives)."""
        label = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        if self.cached:
            codes = {k: jax.ShapeDtypeStruct((batch_size,) + s.shape, s.dtype)
                     for k, s in self.tokenizer.code_shapes().items()}
            return {**codes, "label": label}
        return {"image": jax.ShapeDtypeStruct((batch_size,) + self.image_shape(), jnp.float32), "label": label}

    def codes_from_batch(self, batch: Batch, frozen: Any) -> Dict[str, jax.Array]:
        """The tokenizer's codes of a batch: cached, or encoded here from batch['image'] (no gradient)."""
        if self.cached:
            codes = {k: batch[k] for k in self.tokenizer.cache_keys}
        else:
            codes = self.tokenizer.encode(self.tokenizer_params(frozen), batch["image"].astype(jnp.float32))
        return jax.tree_util.tree_map(jax.lax.stop_gradient, codes)

    # --- what every family supplies --------------------------------------------------------------------------------
    @abc.abstractmethod
    def init(self, rng: jax.Array) -> Params:
        """Boxed params (logical partitioning metadata kept) for `jax.eval_shape` / sharded init."""

    @abc.abstractmethod
    def loss(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        """Scalar training loss and scalar metrics. Training mode (dropout etc. on)."""

    def loss_at_step(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any,
                     step: jax.Array) -> Tuple[jax.Array, Metrics]:
        """The loss the trainer calls, at update `step` (traced int). A family whose loss follows a schedule (RAR's
        random-order annealing) overrides this; by default the loss does not depend on the step."""
        del step
        return self.loss(params, batch, rng, frozen)

    def sample(self, params: Params, frozen: Any, labels: jax.Array, rng: jax.Array) -> jax.Array:
        """Class-conditional samples as float32 NHWC images in [-1, 1] (settings from config.sample)."""
        raise self._no_sampler_error()

    def search_space(self) -> Dict[str, str]:
        """The config.sample knobs a policy search may tune (`jaxgen.search`): {key: group}, group 'ratio' (a
        fraction in [0, 1)) or 'scale' (a positive value: temperatures, guidance). {} = nothing searchable."""
        return {}

    def sample_with_policy(self, params: Params, frozen: Any, labels: jax.Array, rng: jax.Array,
                           policy: Dict[str, jax.Array]) -> jax.Array:
        """`sample` with the `search_space` knobs given as traced arrays (same shapes as their config values), so
        one compiled sampler serves every policy a search evaluates."""
        raise ConfigError(f"family {self.name!r} has no searchable sampling knobs")

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


class Tokenizer(Family):
    """A family that maps images to codes and back; trained by the same trainer, used frozen by generators.

        codes = tok.encode(params, images)      # dict of arrays: the cacheable representation (`cache_keys`)
        images = tok.decode(params, codes)      # float32 NHWC in [-1, 1]; also takes the generator-side forms
                                                # a tokenizer documents (e.g. {'latent': z} for the KL-VAE)
        tok.code_shapes()                       # per-example ShapeDtypeStruct of each cache key

    `--mode=cache` stores encode(image) and encode(flipped image) under each key (and key + '_flip'); generators
    with data.cache train on them.
    """

    cache_keys: Tuple[str, ...] = ()
    # (file name, tokenizer config) of the released weights the papers used, for the "convert it" hint
    official_weights: Optional[Tuple[str, str]] = None

    @abc.abstractmethod
    def encode(self, params: Params, images: jax.Array) -> Dict[str, jax.Array]:
        """Images NHWC in [-1, 1] -> dict of code arrays with keys `cache_keys`."""

    @abc.abstractmethod
    def decode(self, params: Params, codes: Dict[str, jax.Array]) -> jax.Array:
        """Codes -> float32 images NHWC clipped to [-1, 1]."""

    def code_shapes(self) -> Dict[str, jax.ShapeDtypeStruct]:
        """Per-example shapes and dtypes of `encode`'s arrays (no batch axis), computed abstractly."""
        params = jax.eval_shape(self.init, jax.random.PRNGKey(0))
        from jaxgen.parallel.sharding import unbox

        images = jax.ShapeDtypeStruct((1,) + self.image_shape(), jnp.float32)
        out = jax.eval_shape(self.encode, unbox(params), images)
        return {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in out.items()}

    def reconstruct(self, params: Params, images: jax.Array) -> jax.Array:
        return self.decode(params, self.encode(params, images))


def _dtype(config, key: str):
    name = config.get(key, "float32")
    try:
        return jnp.dtype(name)
    except TypeError:
        raise ConfigError(f"config.{key}={name!r} is not a dtype; use float32, bfloat16 or float16") from None
