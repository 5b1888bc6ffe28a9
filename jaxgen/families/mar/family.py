"""MAR as a trainable family: masked-autoregressive training loss (DiffLoss) and the `sample_tokens` sampler.

Config fields read (beyond `MAR.from_config`'s config.model fields):
  config.model.diffusion_batch_mul  rows of z / targets tiled this many times for DiffLoss (paper 4; default 1)
  config.model.num_sampling_steps   default DDPM respacing of the sampler ("100")
  config.model.scale_factor         latent scale: tokens = posterior sample * scale (default: the tokenizer model's
                                    `scale_factor`, else 0.2325, the official KL-16 value)
  config.data.source                'cached' -> batches hold tokenizer moments (B, h, w, 2z) from --mode=cache;
                                    anything else -> batches hold images and the tokenizer encodes inside the loss
  config.tokenizer.config           the tokenizer's own run config (what the pipeline trains / loads; family 'kl_vae')
  config.tokenizer_model            alternative when there is no tokenizer run config: a ConfigDict holding just the
                                    KL-VAE model fields (AutoencoderKL.from_config: ch, ch_mult, embed_dim, ...)
  config.sample.{num_iter, cfg, cfg_schedule, temperature, num_sampling_steps}

The tokenizer's params are never owned by this family: the pipeline puts them in `frozen['tokenizer']`.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgen.diffusion.diffloss import diffloss_loss, diffloss_sample
from jaxgen.diffusion.gaussian import create_diffusion
from jaxgen.errors import ConfigError
from jaxgen.families.base import Batch, Family, Metrics, Params
from jaxgen.families.mar.model import MAR, init_params, max_visible, patchify, unpatchify
from jaxgen.families.mar.schedule import mar_mask_schedule
from jaxgen.tokenizers.kl_vae import DiagonalGaussian

# Official mask-ratio generator: scipy truncnorm on [0.7, 1.0] around mean 1.0 with std 0.25.
MASK_RATIO_MIN, MASK_RATIO_MEAN, MASK_RATIO_STD = 0.7, 1.0, 0.25
DEFAULT_SCALE = 0.2325


def sample_mask_ratio(rng: jax.Array) -> jax.Array:
    """One mask ratio in [0.7, 1] ~ TruncNormal(1.0, 0.25) (scipy truncnorm(a=-1.2, b=0) * 0.25 + 1)."""
    lo = (MASK_RATIO_MIN - MASK_RATIO_MEAN) / MASK_RATIO_STD
    x = jax.random.truncated_normal(rng, lo, 0.0, (), jnp.float32)
    return jnp.clip(MASK_RATIO_MEAN + MASK_RATIO_STD * x, MASK_RATIO_MIN, 1.0)


def random_orders(rng: jax.Array, batch: int, seq_len: int) -> Tuple[jax.Array, jax.Array]:
    """Per-row uniformly random generation orders.

    Returns (orders, ranks), both (B, L) int32: orders[b, i] = position generated i-th; ranks = its inverse
    (ranks[b, pos] = i). "The first n of the order" is then simply `ranks < n`, a static-shape mask for a dynamic n.
    """
    orders = jnp.argsort(jax.random.uniform(rng, (batch, seq_len)), axis=1).astype(jnp.int32)
    ranks = jnp.argsort(orders, axis=1).astype(jnp.int32)
    return orders, ranks


def training_mask(rng: jax.Array, batch: int, seq_len: int) -> Tuple[jax.Array, jax.Array]:
    """Official `random_masking`: ONE ratio r per batch, ceil(L * r) tokens masked in every row, chosen by per-row
    random orders. Returns (mask (B, L) float32, 1 = masked; r)."""
    rng_ratio, rng_order = jax.random.split(rng)
    ratio = sample_mask_ratio(rng_ratio)
    num_masked = jnp.ceil(seq_len * ratio).astype(jnp.int32)  # dynamic count, static shapes
    _, ranks = random_orders(rng_order, batch, seq_len)
    return (ranks < num_masked).astype(jnp.float32), ratio


def cfg_scales(mask_len: np.ndarray, seq_len: int, cfg: float, schedule: str) -> np.ndarray:
    """CFG scale of every sampling step (static). 'linear' (Muse, as official): 1 + (cfg - 1) * (L - mask_len) / L,
    with mask_len the still-masked count after the step (so it never reaches full cfg); 'constant': cfg."""
    mask_len = np.asarray(mask_len, np.float64)
    if schedule == "linear":
        return (1.0 + (cfg - 1.0) * (seq_len - mask_len) / seq_len).astype(np.float32)
    if schedule == "constant":
        return np.full(mask_len.shape, cfg, np.float32)
    raise ConfigError(f"config.sample.cfg_schedule must be 'linear' or 'constant', got {schedule!r}")


class MARFamily(Family):
    name = "mar"
    tokenizer = "kl_vae"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = MAR.from_config(config)
        m = config.model
        self.seq_len = self.model.seq_len
        self.token_dim = self.model.token_dim
        self.latent_hw = self.model.img_size // self.model.vae_stride
        self.diffusion_batch_mul = int(m.get("diffusion_batch_mul", 1))
        self.cached = config.data.get("source", "") == "cached"
        self.batch_keys = ("moments", "label") if self.cached else ("image", "label")
        self.scale_factor = float(m.get("scale_factor", None) or self._tokenizer_model_field("scale_factor")
                                  or DEFAULT_SCALE)
        # Training masks >= 70% of tokens, so the encoder only needs this many visible slots (exact, ~3x cheaper).
        self.num_keep = max_visible(self.seq_len, MASK_RATIO_MIN)
        self.train_diffusion = create_diffusion(timestep_respacing="", noise_schedule="cosine")
        self._gen_diffusions: Dict[str, Any] = {}
        self._tok = None

    # --- tokenizer ---------------------------------------------------------------------------------------------
    def _tokenizer_config(self) -> Optional[ml_collections.ConfigDict]:
        tok = self.config.get("tokenizer")
        if tok is not None and tok.get("config") is not None:
            return tok.config
        model = self.config.get("tokenizer_model")
        if model is None:
            return None
        # A run config shaped like the generator's (data, dtypes) with the KL-VAE model fields in `model`.
        cfg = ml_collections.ConfigDict(self.config.to_dict())
        cfg.family = "kl_vae"
        cfg.model = model
        return cfg

    def _tokenizer_model_field(self, name: str):
        cfg = self._tokenizer_config()
        return None if cfg is None else cfg.model.get(name, None)

    @property
    def tokenizer_family(self):
        """The KL-VAE family that encodes images / decodes latents with the params in frozen['tokenizer']."""
        if self._tok is None:
            cfg = self._tokenizer_config()
            if cfg is None:
                raise ConfigError("MAR needs its KL-VAE tokenizer's model config: set config.tokenizer.config (a kl_vae "
                                  "run config) or config.tokenizer_model (the KL-VAE config.model fields)")
            from jaxgen.families.kl_vae import KLVAEFamily

            self._tok = KLVAEFamily(cfg)
        return self._tok

    def latents_from_batch(self, batch: Batch, rng: jax.Array, frozen: Any) -> jax.Array:
        """Scaled posterior sample (B, h, w, z): from cached moments, or by encoding batch['image']."""
        if self.cached:
            moments = batch["moments"]
        else:
            moments = self.tokenizer_family.encode_moments(self.tokenizer_params(frozen), batch["image"])
        # The posterior is sampled at train time, as official (also with cached moments).
        z = DiagonalGaussian(jax.lax.stop_gradient(moments)).sample(rng)
        return z * self.scale_factor

    # --- trainer interface -------------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Params:
        return init_params(self.model, rng)

    def loss(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        rng_post, rng_mask, rng_drop, rng_diff = jax.random.split(rng, 4)
        variables = {"params": params}
        latents = self.latents_from_batch(batch, rng_post, frozen)
        tokens = patchify(latents.astype(jnp.float32), self.model.patch_size)
        b, seq_len = tokens.shape[:2]

        mask, ratio = training_mask(rng_mask, b, seq_len)

        z = self.model.apply(variables, tokens, batch["label"].astype(jnp.int32), mask, train=True,
                             num_keep=self.num_keep, rngs={"dropout": rng_drop})
        target = jax.lax.stop_gradient(tokens).reshape(b * seq_len, -1)
        z = z.reshape(b * seq_len, -1)
        rows_mask = mask.reshape(b * seq_len)
        mul = self.diffusion_batch_mul
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

    def load_frozen(self) -> Any:
        """Nothing: the tokenizer params are filled into frozen['tokenizer'] by the pipeline (jaxgen.pipeline.frozen_for)."""
        return {}

    def dummy_batch(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
        label = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
        if self.cached:
            moments_ch = 2 * self.model.vae_embed_dim
            return {"moments": jax.ShapeDtypeStruct((batch_size, self.latent_hw, self.latent_hw, moments_ch),
                                                    jnp.float32), "label": label}
        size = int(self.config.data.get("image_size", self.model.img_size))
        channels = int(self.config.data.get("channels", 3))
        return {"image": jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.float32), "label": label}

    # --- sampling ----------------------------------------------------------------------------------------------
    def gen_diffusion(self, num_sampling_steps):
        key = str(num_sampling_steps)
        if key not in self._gen_diffusions:
            self._gen_diffusions[key] = create_diffusion(timestep_respacing=key, noise_schedule="cosine")
        return self._gen_diffusions[key]

    def sample_tokens(self, params: Params, labels: jax.Array, rng: jax.Array, num_iter: int = 64, cfg: float = 1.0,
                      cfg_schedule: str = "linear", temperature: float = 1.0,
                      num_sampling_steps: Any = None) -> jax.Array:
        """Official `MAR.sample_tokens` with static shapes -> latents (B, h, w, z) NHWC (scaled token space).

        All tokens start masked (value 0), one random order per sample. Step k: run encoder + decoder on the current
        tokens (with CFG: batch [tokens; tokens] with [class emb; fake_latent]); the still-masked count after the step,
        mask_len[k], comes from the cosine schedule, which depends only on (L, num_iter), so it is a constant array
        indexed by the loop step; the tokens predicted at step k are those of order rank in [mask_len[k], mask_len[k-1])
        (the last step: all remaining). DiffLoss samples them with the step's CFG scale.

        Static shapes: each step samples K = max_k(#predicted at step k) rows per image (gathered by order rank; slots
        beyond the step's count are computed and discarded). The official code samples exactly the predicted rows;
        the extra rows are independent draws that are thrown away, so the kept rows have the same distribution, and
        with num_iter = L this is one row per image per step, as official. The whole loop is ONE lax.fori_loop.
        """
        num_iter = int(num_iter)
        cfg = float(cfg)
        use_cfg = cfg != 1.0
        seq_len, tdim = self.seq_len, self.token_dim
        b = labels.shape[0]
        variables = {"params": params}
        diffusion = self.gen_diffusion(num_sampling_steps if num_sampling_steps is not None
                                       else self.config.model.get("num_sampling_steps", "100"))

        mask_len_np, num_pred_np = mar_mask_schedule(seq_len, num_iter)
        mask_len_np = np.asarray(mask_len_np, np.int64)
        k_slots = int(np.max(num_pred_np))
        # Still-masked count before / after each step; after the last step nothing stays masked.
        before = jnp.asarray(np.concatenate([[seq_len], mask_len_np[:-1]]), jnp.int32)
        after = jnp.asarray(np.concatenate([mask_len_np[:-1], [0]]), jnp.int32)
        scales = jnp.asarray(cfg_scales(mask_len_np, seq_len, cfg, cfg_schedule))

        rng_order, rng_loop = jax.random.split(rng)
        orders, ranks = random_orders(rng_order, b, seq_len)
        cond = self.model.apply(variables, labels.astype(jnp.int32), method=MAR.class_embedding)
        if use_cfg:
            cond = jnp.concatenate([cond, self.model.apply(variables, b, method=MAR.null_embedding)], axis=0)

        def mae(mdl, tokens, mask, class_emb):
            return mdl.forward_mae_decoder(mdl.forward_mae_encoder(tokens, mask, class_emb, train=False), mask,
                                           train=False)

        if use_cfg:
            def net(x_t, t, c, scale):
                return self.model.apply(variables, x_t, t, c, scale, method=MAR.denoise_with_cfg)
        else:
            def net(x_t, t, c):
                return self.model.apply(variables, x_t, t, c, method=MAR.denoise)

        rows = jnp.arange(b)[:, None]
        slot = jnp.arange(k_slots, dtype=jnp.int32)[None, :]

        def step(k, tokens):
            mask = (ranks < before[k]).astype(jnp.float32)  # 1 = still masked
            tok_in, mask_in = tokens, mask
            if use_cfg:
                tok_in, mask_in = jnp.concatenate([tokens, tokens]), jnp.concatenate([mask, mask])
            z = self.model.apply(variables, tok_in, mask_in, cond, method=mae)  # (B or 2B, L, D)

            # Positions predicted now: order ranks after[k] .. before[k]-1, gathered into K static slots.
            rank = after[k] + slot  # (1, K)
            valid = jnp.broadcast_to(rank < before[k], (b, k_slots))
            pos = jnp.take_along_axis(orders, jnp.broadcast_to(jnp.minimum(rank, seq_len - 1), (b, k_slots)), axis=1)
            zsel = jnp.take_along_axis(z, jnp.tile(pos, (z.shape[0] // b, 1))[..., None], axis=1)
            zsel = zsel.reshape(-1, z.shape[-1])  # with CFG: [cond rows; uncond rows]
            step_rng = jax.random.fold_in(rng_loop, k)
            if use_cfg:
                sampled = diffloss_sample(net, zsel, step_rng, diffusion, temperature=temperature, cfg=scales[k],
                                          guided=True, channels=tdim)
                sampled = sampled[: b * k_slots]  # drop the null-class half
            else:
                sampled = diffloss_sample(net, zsel, step_rng, diffusion, temperature=temperature, guided=False,
                                          channels=tdim)
            sampled = sampled.reshape(b, k_slots, tdim).astype(tokens.dtype)
            # Invalid slots scatter out of bounds and are dropped.
            return tokens.at[rows, jnp.where(valid, pos, seq_len)].set(sampled, mode="drop")

        tokens = jax.lax.fori_loop(0, num_iter, step, jnp.zeros((b, seq_len, tdim), jnp.float32))
        return unpatchify(tokens, self.model.patch_size, self.model.vae_embed_dim)

    def sample(self, params: Params, frozen: Any, labels: jax.Array, rng: jax.Array) -> jax.Array:
        s = self.config.sample
        latents = self.sample_tokens(
            params, labels, rng, num_iter=int(s.get("num_iter", 64)), cfg=float(s.get("cfg", 1.0)),
            cfg_schedule=str(s.get("cfg_schedule", "linear")), temperature=float(s.get("temperature", 1.0)),
            num_sampling_steps=s.get("num_sampling_steps", None))
        images = self.tokenizer_family.decode(self.tokenizer_params(frozen), latents / self.scale_factor)
        return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
