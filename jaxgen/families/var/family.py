"""VAR as a trainable family: teacher forcing over the whole scale pyramid, and the KV-cached CFG sampler.

Config fields read:
  config.model               the transformer's fields, strictly (`var_from_config`): depth (width 64*depth, depth
                             heads unless embed_dim / num_heads are set), mlp_ratio, drop_path_rate (default
                             0.1*depth/24, rising linearly over the blocks), shared_aln, attn_l2_norm, cond_drop_rate
                             (0.1), init_adaln, init_adaln_gamma (the official `alng`), init_head, init_std,
                             num_classes (default config.data.num_classes), patch_nums (default: the tokenizer's
                             v_patch_nums; must equal them)
  config.loss
    label_smoothing          cross-entropy label smoothing (official default 0)
    train_scales             progressive training stage: 0 (default) trains on every scale; k > 0 trains on the first
                             k scales only (a shorter sequence, so cheaper steps). The official progressive schedule
                             (growing k during one run, warming up the newest scale's loss weight) needs the step
                             inside the loss, which the trainer does not pass: run the stages as successive runs
                             (config.init_from = the previous stage's workdir) instead.
  config.tokenizer.config    the msvq tokenizer's run config (what the pipeline trains / loads); its params arrive in
                             frozen['tokenizer']; with data.cache batches hold its cached 'indices'

  config.sample              cfg, top_k, top_p, more_smooth (official FID settings: 1.5, 900, 0.96, False)

Loss: images -> frozen tokenizer -> per-scale token ids and the teacher-forcing input -> VAR logits -> cross-entropy,
a plain mean over all L tokens (as official). The class label is swapped for the null class with p = cond_drop_rate
inside the model; drop path is active in training.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Tuple

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


@dataclasses.dataclass(frozen=True)
class VARLoss:
    label_smoothing: float = 0.0
    train_scales: int = 0  # 0: every scale


@dataclasses.dataclass(frozen=True)
class VARSample:
    cfg: float = 1.5
    top_k: int = 0
    top_p: float = 0.0
    more_smooth: bool = False


class VARFamily(Family):
    name = "var"
    tokenizer_families = ("msvq",)
    LossSettings = VARLoss
    SampleSettings = VARSample
    supports = ("remat", "attention_impl")

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        tok = self.tokenizer
        m = dict(config.model)
        pns = tuple(int(p) for p in m.get("patch_nums") or tok.patch_nums)
        if pns != tok.patch_nums:
            raise ConfigError(f"config.model.patch_nums {pns} differ from the tokenizer's v_patch_nums "
                              f"{tok.patch_nums}; make them equal (or drop config.model.patch_nums)")
        m["patch_nums"] = pns
        m.setdefault("num_classes", int(config.data.num_classes))
        self.model: VAR = var_from_config(m, vocab_size=tok.model.vocab_size, cvae=tok.model.z_channels,
                                          attn_impl=str(config.attention_impl), remat=bool(config.remat),
                                          dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(pns)
        self.train_scales = self.loss_settings.train_scales or n
        if not 1 <= self.train_scales <= n:
            raise ConfigError(f"config.loss.train_scales={self.train_scales} must be 0 (all) or in 1..{n}")
        if self.image_shape()[0] != tok.image_size:
            raise ConfigError(f"config.data.image_size={self.image_shape()[0]} but the tokenizer maps "
                              f"{tok.image_size}px images onto its last patch number {pns[-1]}; make them equal")

    def teacher_forcing_inputs(self, batch: Batch, frozen: Any) -> Tuple[List[jax.Array], jax.Array]:
        """A batch (images or cached indices) -> (token ids per scale [(B, pn^2)], teacher-forcing input
        (B, L - first_l, Cvae)), both cut to the first `train_scales` scales."""
        tok_params = self.tokenizer_params(frozen)
        idx_list = self.tokenizer.split_scales(self.codes_from_batch(batch, frozen)["indices"])
        x_in = self.tokenizer.var_input(tok_params, idx_list)
        k = self.train_scales
        end = begin_ends(self.model.patch_nums)[k - 1][1]
        return idx_list[:k], jax.lax.stop_gradient(x_in[:, :end - self.model.first_l])

    # --- trainer interface -------------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Params:
        labels = jnp.zeros((1,), jnp.int32)
        x = jnp.zeros((1, self.model.seq_len - self.model.first_l, self.model.cvae), jnp.float32)
        return self.model.init({"params": rng}, labels, x)["params"]

    def loss(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        idx_list, x_in = self.teacher_forcing_inputs(batch, frozen)
        targets = jnp.concatenate(idx_list, axis=1)  # (B, L)
        logits = self.model.apply({"params": params}, batch["label"].astype(jnp.int32), x_in, train=True,
                                  rngs={"dropout": rng})
        per_token = cross_entropy(logits, targets, self.loss_settings.label_smoothing)
        loss = jnp.mean(per_token)
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        tail = slice(*begin_ends(self.model.patch_nums)[self.train_scales - 1])  # the finest trained scale
        metrics = {"loss": loss, "acc": jnp.mean(correct), "loss_tail": jnp.mean(per_token[:, tail]),
                   "acc_tail": jnp.mean(correct[:, tail])}
        return loss, metrics

    def weight_decay_mask(self, params: Params) -> Any:
        return var_weight_decay_mask(params)

    # --- sampling ----------------------------------------------------------------------------------------------
    def sample(self, params: Params, frozen: Any, labels: jax.Array, rng: jax.Array) -> jax.Array:
        """KV-cached CFG sampling (see `autoregressive_infer_cfg`) with config.sample's settings; images NHWC float32
        in [-1, 1]. Call under jit (`jaxgen.sampling.Sampler` does): every scale unrolls into one program, compiled
        once per batch size."""
        return self.sample_with_policy(params, frozen, labels, rng, {})

    def search_space(self):
        """cfg, and top_p when the config filters with it (top_k is an integer: not searched)."""
        return {"cfg": "scale", **({"top_p": "ratio"} if self.sample_settings.top_p > 0 else {})}

    def sample_with_policy(self, params: Params, frozen: Any, labels: jax.Array, rng: jax.Array, policy) -> jax.Array:
        s = self.sample_settings
        p = {"cfg": s.cfg, "top_p": s.top_p, **(policy or {})}
        return autoregressive_infer_cfg(self.model, self.tokenizer, params, self.tokenizer_params(frozen), labels,
                                        rng, cfg=p["cfg"], top_k=s.top_k, top_p=p["top_p"], more_smooth=s.more_smooth)
