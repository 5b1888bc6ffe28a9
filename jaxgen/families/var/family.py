"""VAR as a trainable family: teacher forcing over the whole scale pyramid, and the KV-cached CFG sampler.

Config fields read:
  config.model               the transformer (`var_from_config`): depth (width 64*depth, depth heads unless embed_dim /
                             num_heads are set), mlp_ratio, drop_path_rate (default 0.1*depth/24, rising linearly over
                             the blocks), shared_aln, attn_l2_norm, cond_drop_rate (0.1), init_adaln, init_adaln_gamma
                             (the official `alng`), init_head, init_std, num_classes (default config.data.num_classes),
                             patch_nums (default: the tokenizer's v_patch_nums; must equal them), plus
    label_smoothing          cross-entropy label smoothing (official default 0)
    train_scales             progressive training stage: 0 (default) trains on every scale; k > 0 trains on the first
                             k scales only (a shorter sequence, so cheaper steps). The official progressive schedule
                             (growing k during one run, warming up the newest scale's loss weight) needs the step
                             inside the loss, which the trainer does not pass: run the stages as successive runs
                             (config.init_from = the previous stage's workdir) instead.
  config.tokenizer.config    the msvq tokenizer's run config (what the pipeline trains / loads); its params arrive in
                             frozen['tokenizer']
  config.sample              cfg, top_k, top_p, more_smooth (official FID settings: 1.5, 900, 0.96, False)

Loss: images -> frozen tokenizer -> per-scale token ids and the teacher-forcing input -> VAR logits -> cross-entropy,
a plain mean over all L tokens (as official). The class label is swapped for the null class with p = cond_drop_rate
inside the model; drop path is active in training.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from jaxgen.errors import ConfigError
from jaxgen.families.base import Batch, Family, Metrics, Params
from jaxgen.families.var.model import VAR, begin_ends, var_from_config
from jaxgen.families.var.sampler import autoregressive_infer_cfg

# The official `filter_params` no-weight-decay name fragments that exist in VAR's param tree (the official list also
# names cls_token, start_token, task_token, cfg_uncond, pos_embed, start_pos, gamma, beta and moe_bias, which VAR does
# not have). On top of these: every 1-D param and every bias.
NO_DECAY_KEYS = ("pos_start", "pos_1LC", "lvl_embed", "ada_gss", "scale_mul")


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-token cross-entropy (B, L) in float32, torch semantics for label smoothing: the target distribution is
    (1 - ls) * one_hot + ls / V."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if label_smoothing <= 0.0:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)


def var_weight_decay_mask(params: Params) -> Any:
    """True = decay: the official VAR rule (no decay for 1-D params, biases and NO_DECAY_KEYS)."""
    def decay(path, p):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if p.ndim <= 1 or names[-1] == "bias":
            return False
        return not any(key in name for name in names for key in NO_DECAY_KEYS)
    return jax.tree_util.tree_map_with_path(decay, params)


class VARFamily(Family):
    name = "var"
    tokenizer = "msvq"
    batch_keys = ("image", "label")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.tokenizer_family = self._build_tokenizer_family()
        vae = self.tokenizer_family.model
        m = dict(config.model)
        pns = tuple(int(p) for p in m.get("patch_nums") or vae.v_patch_nums)
        if pns != tuple(vae.v_patch_nums):
            raise ConfigError(f"config.model.patch_nums {pns} differ from the tokenizer's v_patch_nums "
                              f"{tuple(vae.v_patch_nums)}; make them equal (or drop config.model.patch_nums)")
        m["patch_nums"] = pns
        m.setdefault("num_classes", int(config.data.get("num_classes", 1000)))
        dtype = jnp.dtype(config.get("compute_dtype", "float32"))
        param_dtype = jnp.dtype(config.get("param_dtype", "float32"))
        self.model: VAR = var_from_config(m, vocab_size=vae.vocab_size, cvae=vae.z_channels,
                                          attn_impl=str(config.get("attention_impl", "auto")),
                                          remat=bool(config.get("remat", False)), dtype=dtype, param_dtype=param_dtype)
        self.label_smoothing = float(m.get("label_smoothing", 0.0) or 0.0)
        n = len(pns)
        self.train_scales = int(m.get("train_scales", 0) or 0) or n
        if not 1 <= self.train_scales <= n:
            raise ConfigError(f"config.model.train_scales={self.train_scales} must be 0 (all) or in 1..{n}")
        self.image_size = self.tokenizer_family.image_size
        data_size = int(config.data.get("image_size", self.image_size))
        if data_size != self.image_size:
            raise ConfigError(f"config.data.image_size={data_size} but the tokenizer maps {self.image_size}px images "
                              f"onto its last patch number {pns[-1]}; make them equal")

    # --- tokenizer ---------------------------------------------------------------------------------------------
    def _build_tokenizer_family(self):
        tok = self.config.get("tokenizer")
        tok_cfg = None if tok is None else tok.get("config")
        if tok_cfg is None:
            raise ConfigError("VAR needs its multi-scale VQ tokenizer's run config in config.tokenizer.config "
                              "(family 'msvq', e.g. configs/vqvae_256.py or configs/msvq_tiny.py)")
        if tok_cfg.family != "msvq":
            raise ConfigError(f"VAR's tokenizer must be family 'msvq', got {tok_cfg.family!r}")
        from jaxgen.families.msvq import MSVQFamily

        return MSVQFamily(tok_cfg)

    def teacher_forcing_inputs(self, images: jax.Array, frozen: Any) -> Tuple[List[jax.Array], jax.Array]:
        """Images -> (token ids per scale [(B, pn^2)], teacher-forcing input (B, L - first_l, Cvae)), both cut to the
        first `train_scales` scales."""
        tok_params = self.tokenizer_params(frozen)
        idx_list = self.tokenizer_family.img_to_idx(tok_params, images)
        x_in = self.tokenizer_family.idx_to_var_input(tok_params, idx_list)
        k = self.train_scales
        end = begin_ends(self.model.patch_nums)[k - 1][1]
        idx_list = [jax.lax.stop_gradient(i) for i in idx_list[:k]]
        return idx_list, jax.lax.stop_gradient(x_in[:, :end - self.model.first_l])

    # --- trainer interface -------------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Params:
        labels = jnp.zeros((1,), jnp.int32)
        x = jnp.zeros((1, self.model.seq_len - self.model.first_l, self.model.cvae), jnp.float32)
        return self.model.init({"params": rng}, labels, x)["params"]

    def loss(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        idx_list, x_in = self.teacher_forcing_inputs(batch["image"].astype(jnp.float32), frozen)
        targets = jnp.concatenate(idx_list, axis=1)  # (B, L)
        logits = self.model.apply({"params": params}, batch["label"].astype(jnp.int32), x_in, train=True,
                                  rngs={"dropout": rng})
        per_token = cross_entropy(logits, targets, self.label_smoothing)
        loss = jnp.mean(per_token)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        tail = slice(*begin_ends(self.model.patch_nums)[self.train_scales - 1])  # the finest trained scale
        metrics = {"loss": loss, "acc": jnp.mean(correct), "loss_tail": jnp.mean(per_token[:, tail]),
                   "acc_tail": jnp.mean(correct[:, tail])}
        return loss, metrics

    def weight_decay_mask(self, params: Params) -> Any:
        return var_weight_decay_mask(params)

    def dummy_batch(self, batch_size: int) -> Dict[str, jax.ShapeDtypeStruct]:
        s, c = self.image_size, self.tokenizer_family.model.in_channels
        return {"image": jax.ShapeDtypeStruct((batch_size, s, s, c), jnp.float32),
                "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

    # --- sampling ----------------------------------------------------------------------------------------------
    def sample_settings(self) -> Dict[str, Any]:
        s = self.config.sample
        return dict(cfg=float(s.get("cfg", 1.5)), top_k=int(s.get("top_k", 0)), top_p=float(s.get("top_p", 0.0)),
                    more_smooth=bool(s.get("more_smooth", False)))

    def sample(self, params: Params, frozen: Any, labels: jax.Array, rng: jax.Array) -> jax.Array:
        """KV-cached CFG sampling (see `autoregressive_infer_cfg`) with config.sample's settings; images NHWC float32
        in [-1, 1]. Call under jit (`jaxgen.sampling.generate` does): every scale unrolls into one program, compiled
        once per batch size."""
        return autoregressive_infer_cfg(self.model, self.tokenizer_family.model, params,
                                        self.tokenizer_params(frozen), labels, rng, **self.sample_settings())
