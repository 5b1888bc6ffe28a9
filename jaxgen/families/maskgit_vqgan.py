"""The MaskGIT-VQGAN tokenizer (RAR's and MaskGIT's) as a trainable family.

config.model: the MaskGITVQGAN fields (jaxgen.tokenizers.maskgit_vqgan), built strictly.
config.loss:
  recon_loss        'l2' | 'l1', on images in [0, 1] (the module's input range)            default 'l2'
  vq_weight         weight of the official VQ loss (beta on the codebook term inside)       default 1.0
  dead_code_weight  weight of the stateless dead-code pull (`jaxgen.nn.quantizer`)          default 0.1
  entropy_weight    MaskGIT's entropy term on soft code assignments: per-token entropy down, batch-mean entropy up
                    (use the whole codebook); 0 = off                                         default 0.0
  entropy_temperature  softmax temperature over negative squared distances                    default 0.01
Loss = recon + vq_weight * vq + dead_code_weight * dead + entropy_weight * entropy + extra_losses (hook for LPIPS /
adversarial terms). The official tokenizer's training recipe was never released; these are jaxgen's.
Metrics: recon_mse, vq_loss, dead_code, entropy, code_usage, dead_fraction, perplexity.

Tokenizer protocol: images in [-1, 1] are mapped to the module's [0, 1]; encode -> {'indices': (B, h*w) int32,
row-major}; decode takes {'indices'} and returns the official clamp to [0, 1], mapped back to [-1, 1].
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from jaxgen import strict
from jaxgen.errors import ConfigError
from jaxgen.families.base import Batch, Metrics, Params, Tokenizer
from jaxgen.nn.quantizer import code_distances, dead_code_loss, perplexity, usage_fraction
from jaxgen.tokenizers.maskgit_vqgan import MaskGITVQGAN

DEAD_CODE_ANCHOR_SEED = 0x5EED  # fixed: each code keeps its dead-code anchor from step to step


@dataclasses.dataclass(frozen=True)
class MaskGITVQGANLoss:
    recon_loss: str = "l2"
    vq_weight: float = 1.0
    dead_code_weight: float = 0.1
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01

    def __post_init__(self):
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")


def entropy_loss(z: jax.Array, codebook: jax.Array, temperature: float) -> jax.Array:
    """MaskGIT-style entropy regulariser: mean per-token entropy of softmax(-d / T) minus the entropy of its batch mean
    (low per token = confident assignments; high on average = every code used)."""
    d = code_distances(z.reshape(-1, z.shape[-1]).astype(jnp.float32), codebook.astype(jnp.float32))
    p = jax.nn.softmax(-d / temperature, axis=-1)
    logp = jax.nn.log_softmax(-d / temperature, axis=-1)
    per_token = -jnp.mean(jnp.sum(p * logp, axis=-1))
    avg = jnp.mean(p, axis=0)
    return per_token + jnp.sum(avg * jnp.log(jnp.maximum(avg, 1e-10)))


class MaskGITVQGANFamily(Tokenizer):
    name = "maskgit_vqgan"
    LossSettings = MaskGITVQGANLoss
    cache_keys = ("indices",)
    official_weights = ("maskgit-vqgan-imagenet-f16-256.bin", "configs/maskgit_vqgan.py")

    def __init__(self, config):
        super().__init__(config)
        self.model: MaskGITVQGAN = strict.build(MaskGITVQGAN, config.model, "config.model", dtype=self.dtype,
                                                param_dtype=self.param_dtype)
        size, _, channels = self.image_shape()
        if channels != self.model.num_channels:
            raise ConfigError(f"config.data.channels={channels} but the VQGAN has num_channels="
                              f"{self.model.num_channels}; make them equal")
        if size % self.model.downsample_factor:
            raise ConfigError(f"image size {size} is not divisible by the VQGAN stride {self.model.downsample_factor}")

    @property
    def tokens_per_image(self) -> int:
        side = self.image_shape()[0] // self.model.downsample_factor
        return side * side

    # --- trainer interface -------------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Params:
        return self.model.init({"params": rng}, jnp.zeros((1,) + self.image_shape(), jnp.float32), train=False)["params"]

    def loss(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        s = self.loss_settings
        x01 = (batch["image"].astype(jnp.float32) + 1.0) * 0.5
        rng_drop, rng_extra = jax.random.split(rng)
        out = self.model.apply({"params": params}, x01, train=True, rngs={"dropout": rng_drop})
        err = out["recon"] - x01
        rec = jnp.mean(jnp.abs(err)) if s.recon_loss == "l1" else jnp.mean(jnp.square(err))
        codebook = params["quantize"]["embedding"]
        counts = out["counts"]
        zero = jnp.zeros((), jnp.float32)
        z = jax.lax.stop_gradient(out["z"]).reshape(-1, out["z"].shape[-1])
        dead = dead_code_loss(codebook, counts, z, jax.random.PRNGKey(DEAD_CODE_ANCHOR_SEED)) \
            if s.dead_code_weight else zero
        ent = entropy_loss(out["z"], codebook, s.entropy_temperature) if s.entropy_weight else zero
        extra, extra_metrics = self.extra_losses(params, x01, out["recon"], rng_extra, frozen)
        total = rec + s.vq_weight * out["vq_loss"] + s.dead_code_weight * dead + s.entropy_weight * ent + extra
        metrics = {"loss": total, "recon_mse": jnp.mean(jnp.square(err)), "vq_loss": out["vq_loss"],
                   "dead_code": dead, "entropy": ent, "code_usage": usage_fraction(counts),
                   "dead_fraction": 1.0 - usage_fraction(counts), "perplexity": perplexity(counts), **extra_metrics}
        return total, metrics

    def extra_losses(self, params: Params, images01: jax.Array, recon01: jax.Array, rng: jax.Array,
                     frozen: Any) -> Tuple[jax.Array, Metrics]:
        """Hook for perceptual (LPIPS) / adversarial terms on [0, 1] images: (scalar added to the loss, metrics)."""
        return jnp.zeros((), jnp.float32), {}

    def weight_decay_mask(self, params: Params) -> Any:
        def decay(path, p):  # no decay on the codebook (pulled by the VQ loss) nor on 1-D params
            return p.ndim >= 2 and "quantize" not in jax.tree_util.keystr(path)
        return jax.tree_util.tree_map_with_path(decay, params)

    # --- tokenizer protocol ------------------------------------------------------------------------------------
    def encode(self, params: Params, images: jax.Array) -> Dict[str, jax.Array]:
        x01 = (images.astype(jnp.float32) + 1.0) * 0.5
        idx = self.model.apply({"params": params}, x01, method=MaskGITVQGAN.encode_to_indices)
        return {"indices": idx.reshape(idx.shape[0], -1).astype(jnp.int32)}

    def decode(self, params: Params, codes: Dict[str, jax.Array]) -> jax.Array:
        if "indices" not in codes:
            raise ConfigError(f"the MaskGIT-VQGAN decodes {{'indices'}}, got keys {sorted(codes)}")
        x01 = self.model.apply({"params": params}, codes["indices"], method=MaskGITVQGAN.decode_indices)
        return x01 * 2.0 - 1.0
