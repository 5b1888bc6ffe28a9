"""RAR as a trainable family: causal next-token loss over randomly permuted orders annealed to raster, and the
KV-cached raster sampler.

Config read:
  config.model   the RAR module's fields (jaxgen.families.rar.model.RAR), built strictly; codebook_size and
                 image_seq_len come from the tokenizer, num_classes must equal config.data.num_classes
  config.loss    randomize_start / randomize_end: the probability r of a random order is 1 before randomize_start,
                 0 after randomize_end, linear between (official: 125k / 187.5k of 250k steps); r is logged
  config.sample  guidance_scale, guidance_scale_pow (power-cosine schedule; pow 0 = constant), temperature,
                 modulation_mb (speed: room for the adaLN modulations of the decode slots computed at once)
  config.tokenizer.config  the MaskGIT-VQGAN tokenizer's run config; with data.cache batches hold its 'indices'
                 (the official code pre-tokenizes), otherwise it encodes each batch inside the loss
"""
from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import jax
import jax.numpy as jnp

from jaxgen import strict
from jaxgen.errors import ConfigError
from jaxgen.families.base import Batch, Family, Metrics, Params
from jaxgen.families.rar.model import RAR, init_params, sample_orders, shuffle_tokens
from jaxgen.families.rar.sampler import generate_tokens, truncate_to_uint8_grid

# Official weight-decay exclusions (name fragments, case-sensitive as official) on top of every < 2-D param.
NO_DECAY_FRAGMENTS = ("ln", "bias", "embed", "embedding", "norm", "gamma", "mask_token", "latent_tokens")


@dataclasses.dataclass(frozen=True)
class RARLoss:
    randomize_start: int = 125_000
    randomize_end: int = 187_500

    def __post_init__(self):
        if not 0 <= self.randomize_start <= self.randomize_end:
            raise ValueError(f"need 0 <= randomize_start <= randomize_end, got {self.randomize_start}, "
                             f"{self.randomize_end}")


@dataclasses.dataclass(frozen=True)
class RARSample:
    guidance_scale: float = 16.0
    guidance_scale_pow: float = 2.75
    temperature: float = 1.0  # official randomize_temperature
    # speed only: MB for the adaLN modulations of the slots one matmul computes ahead (see rar/sampler.py)
    modulation_mb: int = 32


def random_order_ratio(step, start: int, end: int) -> jax.Array:
    """r(step): 1 before `start`, 0 after `end`, linear between (a step function when start == end)."""
    step = jnp.asarray(step, jnp.float32)
    if end <= start:
        return jnp.where(step < start, 1.0, 0.0)
    return jnp.clip((end - step) / (end - start), 0.0, 1.0)


class RARFamily(Family):
    name = "rar"
    tokenizer_families = ("maskgit_vqgan",)
    LossSettings = RARLoss
    SampleSettings = RARSample
    supports = ("remat", "attention_impl")

    def __init__(self, config):
        super().__init__(config)
        tok = self.tokenizer
        self.model: RAR = strict.build(RAR, config.model, "config.model", codebook_size=tok.model.codebook_size,
                                       image_seq_len=tok.tokens_per_image, dtype=self.dtype,
                                       param_dtype=self.param_dtype, attention_impl=str(config.attention_impl),
                                       remat=bool(config.remat))
        if self.model.num_classes != int(config.data.num_classes):
            raise ConfigError(f"config.model.num_classes={self.model.num_classes} but config.data.num_classes="
                              f"{config.data.num_classes}; make them equal")

    # --- trainer interface -------------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Params:
        return init_params(self.model, rng)

    def loss(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        """The loss at step 0 (random orders with probability 1, the start of the official schedule)."""
        return self.loss_at_step(params, batch, rng, frozen, jnp.zeros((), jnp.int32))

    def loss_at_step(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any,
                     step: jax.Array) -> Tuple[jax.Array, Metrics]:
        s = self.loss_settings
        tokens = self.codes_from_batch(batch, frozen)["indices"].astype(jnp.int32)
        b, seq = tokens.shape
        rng_order, rng_drop = jax.random.split(rng)
        ratio = random_order_ratio(step, s.randomize_start, s.randomize_end)
        orders = sample_orders(rng_order, b, seq, ratio)
        logits = self.model.apply({"params": params}, tokens, batch["label"].astype(jnp.int32), orders, train=True,
                                  rngs={"dropout": rng_drop})
        targets = shuffle_tokens(tokens, orders)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        loss = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
        acc = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
        return loss, {"loss": loss, "acc": acc, "random_ratio": ratio}

    def weight_decay_mask(self, params: Params) -> Any:
        """Official: no decay for < 2-D params nor names with ln / bias / embed / norm / ... (cls_token IS decayed,
        adaln_before_head is not)."""
        def decay(path, p):
            name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            return p.ndim >= 2 and not any(f in name for f in NO_DECAY_FRAGMENTS)
        return jax.tree_util.tree_map_with_path(decay, params)

    # --- sampling ----------------------------------------------------------------------------------------------
    def search_space(self):
        return {"guidance_scale": "scale", "guidance_scale_pow": "scale", "temperature": "scale"}

    def sample_tokens(self, params: Params, labels: jax.Array, rng: jax.Array, policy=None) -> jax.Array:
        """policy: {guidance_scale / guidance_scale_pow / temperature: traced value} replacing config.sample's."""
        s = dataclasses.asdict(self.sample_settings)
        s.update(policy or {})
        return generate_tokens(self.model, params, labels, rng, s["guidance_scale"], s["guidance_scale_pow"],
                               s["temperature"], self.sample_settings.modulation_mb << 20)

    def sample_with_policy(self, params: Params, frozen: Any, labels: jax.Array, rng: jax.Array, policy) -> jax.Array:
        tokens = self.sample_tokens(params, labels, rng, policy)
        images = self.tokenizer.decode(self.tokenizer_params(frozen), {"indices": tokens})
        return truncate_to_uint8_grid((images + 1.0) * 0.5)

    def sample(self, params: Params, frozen: Any, labels: jax.Array, rng: jax.Array) -> jax.Array:
        return self.sample_with_policy(params, frozen, labels, rng, None)
