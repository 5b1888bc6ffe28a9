"""VAR's multi-scale VQ tokenizer as a trainable family (the official repo never released this training code).

config.model: the VQVAE fields (`jaxgen.tokenizers.msvq.VQVAE`: vocab_size, z_channels, ch, ch_mult, num_res_blocks,
num_groups, using_sa, using_mid_sa, beta, quant_resi, share_quant_resi, v_patch_nums, ...), built strictly.
config.loss:
  recon_loss        'l2' (VAR's pixel term, per the VAR paper's tokenizer description) | 'l1'   default 'l2'
  vq_weight         weight of the multi-scale VQ loss (commitment beta inside)               default 1.0
  dead_code_weight  weight of the dead-code pull (below); 0 turns the policy off                 default 0.1
Loss = recon + vq_weight * vq + dead_code_weight * dead + extra_losses (hook for LPIPS / GAN terms).
Metrics: recon_mse, vq_loss, dead_code, code_usage (fraction of the codebook hit in the batch, all scales),
usage_last_scale, perplexity (exp entropy of the batch's code histogram), dead_fraction (= 1 - code_usage).

Tokenizer protocol: encode -> {'indices': (B, L) int32, every scale's row-major token map concatenated coarse to
fine}; decode takes {'indices'} or {'features': f_hat (B, h, w, Cvae)}. VAR's teacher forcing and next-scale sampler
use the extra operations below (`split_scales`, `var_input`, `next_ar_input`, `codebook`), never the module itself.

Code usage is tracked per batch and reported as metrics (the logger averages them over each log interval); the
official ema_vocab_hit_SV buffer is training state a pure loss cannot carry, so it is not kept.

Dead-code policy, chosen to fit the functional trainer (the loss cannot write params, and no usage state survives a
step): every code unused in the batch (at any scale) is pulled by an extra loss term towards one of the batch's
quantiser inputs (the per-scale residuals the codebook has to cover, stop-gradient): the one nearest a fixed per-code
anchor (`jaxgen.nn.quantizer.dead_code_loss`), so each dead code keeps heading for its own region of the data. Codes
that win assignments get no pull, so live codes are untouched; a dead code walks into the data under the optimizer
(about lr per step with Adam, whatever the weight) until it wins assignments again. A hard restart (copying features
into dead codes) would need a post-update hook with usage state in the trainer; `jaxgen.nn.quantizer.reinit_dead_codes`
is that operation for such a caller.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp

from jaxgen import strict
from jaxgen.errors import ConfigError
from jaxgen.families.base import Batch, Metrics, Params, Tokenizer
from jaxgen.nn.quantizer import dead_code_loss, perplexity, usage_fraction
from jaxgen.tokenizers.msvq import VQVAE


# Fixed, so every code keeps its dead-code anchor from step to step (see jaxgen.nn.quantizer.dead_code_loss).
DEAD_CODE_ANCHOR_SEED = 0x5EED


@dataclasses.dataclass(frozen=True)
class MSVQLoss:
    recon_loss: str = "l2"
    vq_weight: float = 1.0
    dead_code_weight: float = 0.1

    def __post_init__(self):
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")


class MSVQFamily(Tokenizer):
    name = "msvq"
    LossSettings = MSVQLoss
    cache_keys = ("indices",)
    official_weights = ("vae_ch160v4096z32.pth", "configs/vqvae_256.py")

    def __init__(self, config):
        super().__init__(config)
        self.model: VQVAE = strict.build(VQVAE, config.model, "config.model", dtype=self.dtype,
                                         param_dtype=self.param_dtype)
        stride = 2 ** (len(self.model.ch_mult) - 1)
        size, _, channels = self.image_shape()
        if channels != self.model.in_channels:
            raise ConfigError(f"config.data.channels={channels} but the VQVAE has in_channels={self.model.in_channels}")
        if size != self.model.v_patch_nums[-1] * stride:
            raise ConfigError(f"image size {size} must equal the last patch number "
                              f"{self.model.v_patch_nums[-1]} x the VQVAE stride {stride} (config.model.v_patch_nums)")

    @property
    def image_size(self) -> int:
        return self.image_shape()[0]

    # --- trainer interface -------------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Params:
        x = jnp.zeros((1,) + self.image_shape(), jnp.float32)
        return self.model.init({"params": rng}, x, train=False)["params"]

    def loss(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        s = self.loss_settings
        images = batch["image"].astype(jnp.float32)
        rng_drop, rng_extra = jax.random.split(rng)
        out = self.model.apply({"params": params}, images, train=True, rngs={"dropout": rng_drop})
        err = out["recon"] - images
        rec = jnp.mean(jnp.abs(err)) if s.recon_loss == "l1" else jnp.mean(jnp.square(err))
        counts = out["counts"]  # (S, V)
        total_counts = jnp.sum(counts, axis=0)
        dead = dead_code_loss(params["codebook"], total_counts, out["z"],
                              jax.random.PRNGKey(DEAD_CODE_ANCHOR_SEED)) \
            if s.dead_code_weight else jnp.zeros((), jnp.float32)
        extra, extra_metrics = self.extra_losses(params, images, out["recon"], rng_extra, frozen)
        total = rec + s.vq_weight * out["vq_loss"] + s.dead_code_weight * dead + extra
        metrics = {"loss": total, "recon_mse": jnp.mean(jnp.square(err)), "vq_loss": out["vq_loss"],
                   "dead_code": dead, "code_usage": usage_fraction(total_counts),
                   "dead_fraction": 1.0 - usage_fraction(total_counts),
                   "usage_last_scale": usage_fraction(counts[-1]), "perplexity": perplexity(total_counts),
                   **extra_metrics}
        return total, metrics

    def extra_losses(self, params: Params, images: jax.Array, recon: jax.Array, rng: jax.Array,
                     frozen: Any) -> Tuple[jax.Array, Metrics]:
        """Hook for perceptual (LPIPS) / adversarial terms: (scalar added to the loss, extra metrics). Frozen networks
        (e.g. LPIPS weights) come through `frozen`."""
        return jnp.zeros((), jnp.float32), {}

    def weight_decay_mask(self, params: Params) -> Any:
        # no decay on the codebook (it is pulled by the VQ loss) nor on 1-D params
        def decay(path, p):
            return p.ndim >= 2 and "codebook" not in jax.tree_util.keystr(path)
        return jax.tree_util.tree_map_with_path(decay, params)

    # --- tokenizer protocol ------------------------------------------------------------------------------------
    def _apply(self, params, method, *args):
        return self.model.apply({"params": params}, *args, method=method)

    def encode(self, params: Params, images: jax.Array) -> Dict[str, jax.Array]:
        return {"indices": jnp.concatenate(self._apply(params, VQVAE.img_to_idx, images), axis=1)}

    def decode(self, params: Params, codes: Dict[str, jax.Array]) -> jax.Array:
        if "features" in codes:
            return self._apply(params, VQVAE.fhat_to_img, codes["features"])
        if "indices" in codes:
            return self._apply(params, VQVAE.idx_to_img, self.split_scales(codes["indices"]))
        raise ConfigError(f"the multi-scale VQ decodes {{'indices'}} or {{'features'}}, got keys {sorted(codes)}")

    # --- what VAR needs beyond the protocol ----------------------------------------------------------------------
    @property
    def patch_nums(self) -> Tuple[int, ...]:
        return tuple(self.model.v_patch_nums)

    def split_scales(self, indices: jax.Array) -> List[jax.Array]:
        """(B, L) concatenated ids -> [(B, pn^2)] per scale."""
        out, start = [], 0
        for pn in self.patch_nums:
            out.append(indices[:, start:start + pn * pn])
            start += pn * pn
        return out

    def var_input(self, params: Params, idx_list: Sequence[jax.Array]) -> jax.Array:
        """Teacher-forcing input (B, L - first_l, Cvae) of per-scale ids."""
        return self._apply(params, VQVAE.idx_to_var_input, list(idx_list))

    def codebook(self, params: Params) -> jax.Array:
        return params["codebook"].astype(jnp.float32)

    def next_ar_input(self, params: Params, si: int, f_hat: jax.Array, h: jax.Array):
        """Sampler step: add scale si's code map h to f_hat -> (f_hat, the next scale's input map)."""
        return self._apply(params, VQVAE.next_ar_input, si, f_hat, h)
