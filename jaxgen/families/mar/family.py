"""MAR as a trainable family: the masked-autoregressive training loss (DiffLoss) and the sampler.

Config read:
  config.model              the MAR module's fields (jaxgen.families.mar.model.MAR), built strictly; includes the
                            official constructor's mask_ratio_min and diffusion_batch_mul
  config.sample             num_iter, cfg, cfg_schedule, temperature, num_sampling_steps, encoder_buckets,
                            diffusion_buckets, diffusion_modulation_mb (`MARSample`)
  config.data.cache         True -> batches hold the tokenizer's moments (B, h, w, 2z) from --mode=cache;
                            False -> batches hold images and the tokenizer encodes inside the loss
  config.tokenizer.config   the KL-VAE tokenizer's run config; its `scale_factor` scales the latents
The tokenizer's params are never owned by this family: the pipeline puts them in `frozen['tokenizer']`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import jax
import jax.numpy as jnp

from jaxgen import strict
from jaxgen.diffusion.diffloss import diffloss_loss
from jaxgen.diffusion.gaussian import create_diffusion
from jaxgen.errors import ConfigError
from jaxgen.families.base import Batch, Family, Metrics, Params
from jaxgen.families.mar.model import MAR, init_params, max_visible, patchify
from jaxgen.families.mar.sampler import random_orders, sample_latents
from jaxgen.tokenizers.kl_vae import DiagonalGaussian

# Official mask-ratio generator: scipy truncnorm on [mask_ratio_min, 1.0] around mean 1.0 with std 0.25.
MASK_RATIO_MEAN, MASK_RATIO_STD = 1.0, 0.25


@dataclasses.dataclass(frozen=True)
class MARSample:
    num_iter: int = 64  # AR steps (the paper's FID runs: 256)
    cfg: float = 1.0
    cfg_schedule: str = "linear"  # linear (official) | constant
    temperature: float = 1.0
    num_sampling_steps: str = "100"  # DDPM respacing of the diffusion head
    # Most compiled sizes for the encoder's tokens / the diffusion head's rows per AR step (jaxgen.sampling.buckets):
    # more = less padded work, longer compile. 16 covers every distinct revealed count at 64 and 256 steps (exact).
    # 8 encoder sizes pad the encoder by 8.2 % / 8.1 % tokens at 64 / 256 steps (16: 3.4 % / 3.9 %; 6: 11.6 % /
    # 10.9 %). MAR-B at 64 steps, batch 2, f32, Intel VM 2026-12-06, 8 against 16 sizes: compile 20.0 vs 30.9 s,
    # peak RSS 1.87 vs 2.14 GB (the compiler's), one call 144.5 vs 147.5 s (the padding is inside the drift).
    encoder_buckets: int = 8
    diffusion_buckets: int = 16
    # Memory for the diffusion head's adaLN modulations of several DDPM steps, computed in one batch per AR step
    # instead of streaming their weights (3/5 of the head's) at every DDPM step; 0: per step, as the official.
    # Small batches gain most (4 rows: all 100 steps' in ~33 MB for MAR-B); large ones fall back to per step.
    diffusion_modulation_mb: int = 64


def sample_mask_ratio(rng: jax.Array, mask_ratio_min: float = 0.7) -> jax.Array:
    """One mask ratio in [min, 1] ~ TruncNormal(1.0, 0.25) (scipy truncnorm(a=(min-1)/0.25, b=0) * 0.25 + 1)."""
    lo = (mask_ratio_min - MASK_RATIO_MEAN) / MASK_RATIO_STD
    x = jax.random.truncated_normal(rng, lo, 0.0, (), jnp.float32)
    return jnp.clip(MASK_RATIO_MEAN + MASK_RATIO_STD * x, mask_ratio_min, 1.0)


def training_mask(rng: jax.Array, batch: int, seq_len: int, mask_ratio_min: float = 0.7) -> Tuple[jax.Array, jax.Array]:
    """Official `random_masking`: ONE ratio r per batch, ceil(L * r) tokens masked in every row, chosen by per-row
    random orders. Returns (mask (B, L) float32, 1 = masked; r)."""
    rng_ratio, rng_order = jax.random.split(rng)
    ratio = sample_mask_ratio(rng_ratio, mask_ratio_min)
    num_masked = jnp.ceil(seq_len * ratio).astype(jnp.int32)  # dynamic count, static shapes
    _, ranks = random_orders(rng_order, batch, seq_len)
    return (ranks < num_masked).astype(jnp.float32), ratio


class MARFamily(Family):
    name = "mar"
    tokenizer_families = ("kl_vae",)
    SampleSettings = MARSample
    supports = ("remat", "scan_layers", "attention_impl")

    def __init__(self, config):
        super().__init__(config)
        self.model = strict.build(MAR, config.model, "config.model", dtype=self.dtype, param_dtype=self.param_dtype,
                                  attention_impl=str(config.attention_impl), remat=bool(config.remat),
                                  scan_layers=bool(config.scan_layers))
        tok = self.tokenizer.model
        if tok.embed_dim != self.model.vae_embed_dim or tok.downsample_factor != self.model.vae_stride:
            raise ConfigError(f"config.model has vae_embed_dim={self.model.vae_embed_dim}, vae_stride="
                              f"{self.model.vae_stride} but the tokenizer gives {tok.embed_dim} channels at stride "
                              f"{tok.downsample_factor}; make them equal")
        if not 0.0 < self.model.mask_ratio_min <= 1.0:
            raise ConfigError(f"config.model.mask_ratio_min={self.model.mask_ratio_min} must be in (0, 1]")
        self.scale_factor = self.tokenizer.scale_factor
        self.seq_len = self.model.seq_len
        # Training masks >= mask_ratio_min of the tokens, so the encoder only needs this many visible slots (exact).
        self.num_keep = max_visible(self.seq_len, self.model.mask_ratio_min)
        self.train_diffusion = create_diffusion(timestep_respacing="", noise_schedule="cosine")
        self.gen_diffusion = create_diffusion(timestep_respacing=str(self.sample_settings.num_sampling_steps),
                                              noise_schedule="cosine")

    def latents_from_batch(self, batch: Batch, rng: jax.Array, frozen: Any) -> jax.Array:
        """Scaled posterior sample (B, h, w, z) of the batch's moments (the posterior is sampled at train time, as
        official, also with cached moments)."""
        moments = self.codes_from_batch(batch, frozen)["moments"]
        return DiagonalGaussian(moments).sample(rng) * self.scale_factor

    # --- trainer interface -------------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Params:
        return init_params(self.model, rng)

    def loss(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        rng_post, rng_mask, rng_drop, rng_diff = jax.random.split(rng, 4)
        variables = {"params": params}
        latents = self.latents_from_batch(batch, rng_post, frozen)
        tokens = patchify(latents.astype(jnp.float32), self.model.patch_size)
        b, seq_len = tokens.shape[:2]

        mask, ratio = training_mask(rng_mask, b, seq_len, self.model.mask_ratio_min)

        z = self.model.apply(variables, tokens, batch["label"].astype(jnp.int32), mask, train=True,
                             num_keep=self.num_keep, rngs={"dropout": rng_drop})
        target = jax.lax.stop_gradient(tokens).reshape(b * seq_len, -1)
        z = z.reshape(b * seq_len, -1)
        rows_mask = mask.reshape(b * seq_len)
        mul = self.model.diffusion_batch_mul
        if mul > 1:  # torch .repeat(mul, 1): the whole row block repeated, each copy gets its own t and noise
            target, z, rows_mask = jnp.tile(target, (mul, 1)), jnp.tile(z, (mul, 1)), jnp.tile(rows_mask, mul)

        def net(x_t, t, c):
            return self.model.apply(variables, x_t, t, c, method=MAR.denoise)

        loss = diffloss_loss(net, target, z, rows_mask, rng_diff, self.train_diffusion)
        return loss, {"loss": loss, "mask_ratio": ratio}

    def weight_decay_mask(self, params: Params) -> Any:
        """Official: no decay for 1-D params, biases, or anything in the diffusion head; pos embeds, mask_token,
        fake_latent and class_emb (all >= 2-D) ARE decayed."""

        def decay(path, p):
            names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
            if "diffloss" in names or (names and names[-1] == "bias"):
                return False
            return p.ndim >= 2

        return jax.tree_util.tree_map_with_path(decay, params)

    # --- sampling ----------------------------------------------------------------------------------------------
    def sample_tokens(self, params: Params, labels: jax.Array, rng: jax.Array, **overrides) -> jax.Array:
        """Latents (B, h, w, z) in the scaled token space with config.sample's settings, or `overrides` of them
        (num_iter, cfg, cfg_schedule, temperature, num_sampling_steps)."""
        s = dataclasses.replace(self.sample_settings, **overrides)
        diffusion = self.gen_diffusion if s.num_sampling_steps == self.sample_settings.num_sampling_steps else \
            create_diffusion(timestep_respacing=str(s.num_sampling_steps), noise_schedule="cosine")
        return sample_latents(self.model, params, labels, rng, diffusion, s.num_iter, s.cfg, s.cfg_schedule,
                              s.temperature, s.encoder_buckets, s.diffusion_buckets,
                              s.diffusion_modulation_mb << 20)

    def sample(self, params: Params, frozen: Any, labels: jax.Array, rng: jax.Array) -> jax.Array:
        return self.sample_with_policy(params, frozen, labels, rng, {})

    def search_space(self):
        return {"cfg": "scale", "temperature": "scale"}

    def sample_with_policy(self, params: Params, frozen: Any, labels: jax.Array, rng: jax.Array, policy) -> jax.Array:
        latents = self.sample_tokens(params, labels, rng, **(policy or {}))
        return self.tokenizer.decode(self.tokenizer_params(frozen), {"latent": latents / self.scale_factor})
