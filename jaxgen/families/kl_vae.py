"""The KL-VAE tokenizer as a trainable family: the same trainer that trains generators trains the tokenizer.

config.model: the AutoencoderKL fields (see `AutoencoderKL.from_config`) plus
  recon_loss   'l1' (LDM's pixel term) | 'l2'                                       default 'l1'
  kl_weight    weight of KL(q(z|x) || N(0, I))                                       default 1e-6 (LDM kl-f configs)
  scale_factor latent scale used by consumers (MAR: z * 0.2325); unused by this family's loss
Loss reductions follow LDM so kl_weight values carry over: the reconstruction error is summed over each image's pixels
and channels, the KL over each latent's elements, both then averaged over the batch. Metrics: recon (that summed term),
kl (per image), mse (per pixel, for reading), loss.

LDM's full recipe adds LPIPS and a patch-GAN (and a learned output log-variance); `extra_losses` is the hook for them.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from jaxgen.errors import ConfigError
from jaxgen.families.base import Batch, Family, Metrics, Params
from jaxgen.tokenizers.kl_vae import AutoencoderKL, DiagonalGaussian


class KLVAEFamily(Family):
    name = "kl_vae"
    batch_keys = ("image", "label")
    tokenizer = None

    def __init__(self, config):
        super().__init__(config)
        self.model = AutoencoderKL.from_config(config)
        model_cfg = config.model if "model" in config else config
        self.recon_loss = str(model_cfg.get("recon_loss", "l1")).lower()
        if self.recon_loss not in ("l1", "l2"):
            raise ConfigError(f"config.model.recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")
        self.kl_weight = float(model_cfg.get("kl_weight", 1e-6))
        data = config.get("data") if hasattr(config, "get") else None
        self.image_size = int(data.image_size) if data is not None and "image_size" in data else self.model.resolution
        channels = int(data.channels) if data is not None and "channels" in data else self.model.in_channels
        if channels != self.model.in_channels or channels != self.model.out_ch:
            raise ConfigError(f"config.data.channels={channels} but the KL-VAE has in_channels="
                              f"{self.model.in_channels}, out_ch={self.model.out_ch}; make them equal")
        if self.image_size % self.model.downsample_factor:
            raise ConfigError(f"image size {self.image_size} is not divisible by the KL-VAE stride "
                              f"{self.model.downsample_factor} (len(config.model.ch_mult) - 1 halvings)")

    # --- trainer interface -------------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Params:
        x = jnp.zeros((1, self.image_size, self.image_size, self.model.in_channels), jnp.float32)
        return self.model.init({"params": rng}, x, sample_posterior=False)["params"]

    def loss(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        images = batch["image"].astype(jnp.float32)
        rng_post, rng_drop, rng_extra = jax.random.split(rng, 3)
        recon, moments = self.model.apply({"params": params}, images, rng_post, sample_posterior=True,
                                          deterministic=False, rngs={"dropout": rng_drop})
        err = recon.astype(jnp.float32) - images
        per_elem = jnp.abs(err) if self.recon_loss == "l1" else jnp.square(err)
        rec = jnp.mean(jnp.sum(per_elem.reshape(per_elem.shape[0], -1), axis=1))
        kl = jnp.mean(DiagonalGaussian(moments).kl())
        extra, extra_metrics = self.extra_losses(params, images, recon, moments, rng_extra, frozen)
        total = rec + self.kl_weight * kl + extra
        metrics = {"loss": total, "recon": rec, "kl": kl, "mse": jnp.mean(jnp.square(err)), **extra_metrics}
        return total, metrics

    def extra_losses(self, params: Params, images: jax.Array, recon: jax.Array, moments: jax.Array,
                     rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        """Hook for perceptual (LPIPS) / adversarial terms: return (scalar added to the loss, extra metrics).

        A subclass can read frozen networks (e.g. LPIPS weights) from `frozen` (supply them via `load_frozen`); a GAN
        needs its discriminator as a second trained model, which this single-params interface does not cover yet.
        """
        return jnp.zeros((), jnp.float32), {}

    def dummy_batch(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
        s, c = self.image_size, self.model.in_channels
        return {"image": jax.ShapeDtypeStruct((batch_size, s, s, c), jnp.float32),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    # --- tokenizer interface (used by generator families, e.g. MAR with params in frozen['tokenizer']) -----------
    def encode_moments(self, params: Params, images: jax.Array) -> jax.Array:
        """Images NHWC in [-1, 1] -> float32 moments (B, h, w, 2*embed_dim) = [mean | logvar], logvar unclamped."""
        return self.model.apply({"params": params}, images, method=AutoencoderKL.encode)

    def decode(self, params: Params, z: jax.Array) -> jax.Array:
        """Latents (B, h, w, embed_dim), unscaled -> float32 images NHWC (not clipped)."""
        return self.model.apply({"params": params}, z, method=AutoencoderKL.decode)

    def reconstruct(self, params: Params, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Encode and decode: the posterior mean without `rng`, a posterior sample with it; clipped to [-1, 1]."""
        post = DiagonalGaussian(self.encode_moments(params, images))
        z = post.mode() if rng is None else post.sample(rng)
        return jnp.clip(self.decode(params, z), -1.0, 1.0)
