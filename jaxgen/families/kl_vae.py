"""The KL-VAE tokenizer as a trainable family: the same trainer that trains generators trains the tokenizer.

config.model: the AutoencoderKL fields (jaxgen.tokenizers.kl_vae), built strictly.
config.loss:
  recon_loss   'l1' (LDM's pixel term) | 'l2'                                       default 'l1'
  kl_weight    weight of KL(q(z|x) || N(0, I))                                       default 1e-6 (LDM kl-f configs)
Loss reductions follow LDM so kl_weight values carry over: the reconstruction error is summed over each image's pixels
and channels, the KL over each latent's elements, both then averaged over the batch. Metrics: recon (that summed term),
kl (per image), mse (per pixel, for reading), loss.

Tokenizer protocol: encode -> {'moments': (B, h, w, 2z) [mean | logvar]}; decode takes {'moments'} (decodes the mean)
or {'latent': z} (a point of the latent space, unscaled: what a generator samples).

LDM's full recipe adds LPIPS and a patch-GAN (and a learned output log-variance); `extra_losses` is the hook for them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from jaxgen import strict
from jaxgen.errors import ConfigError
from jaxgen.families.base import Batch, Metrics, Params, Tokenizer
from jaxgen.tokenizers.kl_vae import AutoencoderKL, DiagonalGaussian


@dataclasses.dataclass(frozen=True)
class KLVAELoss:
    recon_loss: str = "l1"
    kl_weight: float = 1e-6

    def __post_init__(self):
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")


class KLVAEFamily(Tokenizer):
    name = "kl_vae"
    LossSettings = KLVAELoss
    cache_keys = ("moments",)
    official_weights = ("kl16.ckpt", "configs/kl16.py")

    def __init__(self, config):
        super().__init__(config)
        self.model = strict.build(AutoencoderKL, config.model, "config.model", dtype=self.dtype,
                                  param_dtype=self.param_dtype)
        size, _, channels = self.image_shape()
        if channels != self.model.in_channels or channels != self.model.out_ch:
            raise ConfigError(f"config.data.channels={channels} but the KL-VAE has in_channels="
                              f"{self.model.in_channels}, out_ch={self.model.out_ch}; make them equal")
        if size % self.model.downsample_factor:
            raise ConfigError(f"image size {size} is not divisible by the KL-VAE stride "
                              f"{self.model.downsample_factor} (len(config.model.ch_mult) - 1 halvings)")

    @property
    def scale_factor(self) -> float:
        return float(self.model.scale_factor)

    # --- trainer interface -------------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Params:
        x = jnp.zeros((1,) + self.image_shape(), jnp.float32)
        return self.model.init({"params": rng}, x, sample_posterior=False)["params"]

    def loss(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        s = self.loss_settings
        images = batch["image"].astype(jnp.float32)
        rng_post, rng_drop, rng_extra = jax.random.split(rng, 3)
        recon, moments = self.model.apply({"params": params}, images, rng_post, sample_posterior=True,
                                          deterministic=False, rngs={"dropout": rng_drop})
        err = recon.astype(jnp.float32) - images
        per_elem = jnp.abs(err) if s.recon_loss == "l1" else jnp.square(err)
        rec = jnp.mean(jnp.sum(per_elem.reshape(per_elem.shape[0], -1), axis=1))
        kl = jnp.mean(DiagonalGaussian(moments).kl())
        extra, extra_metrics = self.extra_losses(params, images, recon, moments, rng_extra, frozen)
        total = rec + s.kl_weight * kl + extra
        metrics = {"loss": total, "recon": rec, "kl": kl, "mse": jnp.mean(jnp.square(err)), **extra_metrics}
        return total, metrics

    def extra_losses(self, params: Params, images: jax.Array, recon: jax.Array, moments: jax.Array,
                     rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        """Hook for perceptual (LPIPS) / adversarial terms: return (scalar added to the loss, extra metrics).

        A subclass can read frozen networks (e.g. LPIPS weights) from `frozen`; a GAN needs its discriminator as a
        second trained model, which this single-params interface does not cover yet.
        """
        return jnp.zeros((), jnp.float32), {}

    # --- tokenizer protocol ------------------------------------------------------------------------------------
    def encode(self, params: Params, images: jax.Array) -> Dict[str, jax.Array]:
        """Images NHWC in [-1, 1] -> {'moments': float32 (B, h, w, 2*embed_dim) = [mean | logvar]}, logvar unclamped."""
        return {"moments": self.model.apply({"params": params}, images, method=AutoencoderKL.encode)}

    def decode(self, params: Params, codes: Dict[str, jax.Array]) -> jax.Array:
        if "latent" in codes:
            z = codes["latent"]
        elif "moments" in codes:
            z = DiagonalGaussian(codes["moments"]).mode()
        else:
            raise ConfigError(f"the KL-VAE decodes {{'latent'}} or {{'moments'}}, got keys {sorted(codes)}")
        images = self.model.apply({"params": params}, z, method=AutoencoderKL.decode)
        return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
