"""MaskGIT / AutoNAT as a trainable family: masked-token modeling with parallel decoding under a generation policy.

Config read:
  config.model   backbone ('uvit': AutoNAT's U-ViT; 'maskgit': MaskGIT's BERT) and that module's fields, built
                 strictly (jaxgen.families.nat.model); codebook_size and image_seq_len come from the tokenizer,
                 num_classes must equal config.data.num_classes
  config.loss    mask_distribution 'beta' (AutoNAT: beta_a, beta_b; default Beta(12, 3)) or 'schedule' (MaskGIT:
                 gamma(r), r ~ U[0, 1), gamma = mask_schedule); label_smoothing (both official: 0.1)
  config.sample  steps and the generation policy (jaxgen.families.nat.policy): policy='tables' with mask_ratios,
                 remask_temps (steps - 1 each), sample_temps, guidance (steps each), or policy='maskgit' with
                 schedule and choice_temperature
  config.tokenizer.config  the MaskGIT-VQGAN tokenizer's run config; with data.cache batches hold its 'indices'
Weight decay: the U-ViT decays every parameter (AutoNAT's AdamW over model.parameters()); MaskGIT's BERT the >= 2-D
ones (its training code is not released).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import strict
from jaxgen.errors import ConfigError
from jaxgen.families.base import Batch, Family, Metrics, Params
from jaxgen.families.nat.masking import draw_mask_ratios, masked_cross_entropy, token_mask
from jaxgen.families.nat.model import backbone_class, init_params
from jaxgen.families.nat.policy import maskgit_policy, tables_policy
from jaxgen.families.nat.sampler import generate_tokens
from jaxgen.sampling.schedules import check_schedule_name


@dataclasses.dataclass(frozen=True)
class NATLoss:
    mask_distribution: str = "beta"  # beta (AutoNAT) | schedule (MaskGIT)
    beta_a: Optional[float] = None  # default 12 with 'beta'
    beta_b: Optional[float] = None  # default 3 with 'beta'
    mask_schedule: Optional[str] = None  # default 'cosine' with 'schedule'
    label_smoothing: float = 0.1

    def __post_init__(self):
        if self.mask_distribution == "beta":
            if self.mask_schedule is not None:
                raise ValueError("mask_schedule is read only with mask_distribution='schedule'; remove it")
            for name in ("beta_a", "beta_b"):
                value = getattr(self, name)
                if value is not None and not value > 0:
                    raise ValueError(f"{name} must be > 0, got {value}")
        elif self.mask_distribution == "schedule":
            if self.beta_a is not None or self.beta_b is not None:
                raise ValueError("beta_a / beta_b are read only with mask_distribution='beta'; remove them")
            check_schedule_name(self.mask_schedule or "cosine")
        else:
            raise ValueError(f"mask_distribution must be 'beta' or 'schedule', got {self.mask_distribution!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


_TABLE_KEYS = ("mask_ratios", "remask_temps", "sample_temps", "guidance")
_MASKGIT_KEYS = ("schedule", "choice_temperature")


@dataclasses.dataclass(frozen=True)
class NATSample:
    steps: int = 8
    policy: str = "tables"  # tables (AutoNAT's per-step values) | maskgit (schedule + choice temperature)
    mask_ratios: Optional[Tuple[float, ...]] = None
    remask_temps: Optional[Tuple[float, ...]] = None
    sample_temps: Optional[Tuple[float, ...]] = None
    guidance: Optional[Tuple[float, ...]] = None
    schedule: Optional[str] = None  # MaskGIT default 'cosine'
    choice_temperature: Optional[float] = None  # MaskGIT default 4.5

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        own, other = (_TABLE_KEYS, _MASKGIT_KEYS) if self.policy == "tables" else (_MASKGIT_KEYS, _TABLE_KEYS)
        if self.policy not in ("tables", "maskgit"):
            raise ValueError(f"policy must be 'tables' or 'maskgit', got {self.policy!r}")
        stray = [k for k in other if getattr(self, k) is not None]
        if stray:
            raise ValueError(f"{', '.join(stray)} are not read with policy={self.policy!r}; remove them or set "
                             f"policy={'maskgit' if self.policy == 'tables' else 'tables'!r}")
        if self.policy == "tables":
            missing = [k for k in own if getattr(self, k) is None]
            if missing:
                raise ValueError(f"policy='tables' needs {', '.join(missing)} (see configs/autonat_l.py)")
            tables_policy(self.steps, self.mask_ratios, self.remask_temps, self.sample_temps, self.guidance)
        else:
            check_schedule_name(self.schedule or "cosine")

    def arrays(self, seq_len: int) -> Dict[str, jax.Array]:
        if self.policy == "tables":
            return tables_policy(self.steps, self.mask_ratios, self.remask_temps, self.sample_temps, self.guidance)
        temp = 4.5 if self.choice_temperature is None else self.choice_temperature
        return maskgit_policy(self.steps, self.schedule or "cosine", temp, seq_len)


class NATFamily(Family):
    name = "nat"
    tokenizer_families = ("maskgit_vqgan",)
    LossSettings = NATLoss
    SampleSettings = NATSample
    supports = ("remat", "attention_impl")

    def __init__(self, config):
        super().__init__(config)
        tok = self.tokenizer
        fields = dict(config.model)
        self.backbone = str(fields.pop("backbone", "uvit"))
        try:
            cls = backbone_class(self.backbone)
        except ValueError as e:
            raise ConfigError(f"config.model.backbone: {e}") from None
        self.model = strict.build(cls, fields, "config.model", codebook_size=tok.model.codebook_size,
                                  image_seq_len=tok.tokens_per_image, dtype=self.dtype, param_dtype=self.param_dtype,
                                  attention_impl=str(config.attention_impl), remat=bool(config.remat))
        if self.model.num_classes != int(config.data.num_classes):
            raise ConfigError(f"config.model.num_classes={self.model.num_classes} but config.data.num_classes="
                              f"{config.data.num_classes}; make them equal")
        self.policy = {k: jnp.asarray(v) for k, v in self.sample_settings.arrays(self.model.image_seq_len).items()}
        self.use_guidance = bool(np.any(np.asarray(self.policy["guidance"]) != 0))
        if self.use_guidance and self.model.null_label is None:
            raise ConfigError(f"backbone {self.backbone!r} has no null class, so no classifier-free guidance: set "
                              "config.sample.guidance to zeros (or use policy='maskgit')")

    # --- trainer interface -------------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Params:
        return init_params(self.model, rng)

    def loss(self, params: Params, batch: Batch, rng: jax.Array, frozen: Any) -> Tuple[jax.Array, Metrics]:
        s = self.loss_settings
        tokens = self.codes_from_batch(batch, frozen)["indices"].astype(jnp.int32)
        b, seq = tokens.shape
        rng_ratio, rng_scores, rng_drop = jax.random.split(rng, 3)
        ratios = draw_mask_ratios(rng_ratio, b, s.mask_distribution, s.beta_a or 12.0, s.beta_b or 3.0,
                                  s.mask_schedule or "cosine", seq)
        mask = token_mask(ratios, jax.random.uniform(rng_scores, (b, seq)))
        ids = jnp.where(mask, self.model.mask_id, tokens)
        logits = self.model.apply({"params": params}, ids, batch["label"].astype(jnp.int32), train=True,
                                  rngs={"dropout": rng_drop})
        loss, acc = masked_cross_entropy(logits, tokens, mask, s.label_smoothing)
        return loss, {"loss": loss, "acc": acc, "masked_fraction": jnp.mean(mask.astype(jnp.float32))}

    def weight_decay_mask(self, params: Params) -> Any:
        if self.backbone == "uvit":
            return jax.tree_util.tree_map(lambda p: True, params)
        return super().weight_decay_mask(params)

    # --- sampling ----------------------------------------------------------------------------------------------
    def search_space(self) -> Dict[str, str]:
        if self.sample_settings.policy != "tables":
            return {}
        space = {"mask_ratios": "ratio", "remask_temps": "scale", "sample_temps": "scale"}
        if self.model.null_label is not None:
            space["guidance"] = "scale"
        return space

    def _policy_arrays(self, values: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
        """config-form tables (traced) -> the sampler's four (T,) arrays; keys not in `values` keep the config's."""
        unknown = sorted(set(values) - set(_TABLE_KEYS))
        if unknown:
            raise ConfigError(f"NAT policy values {unknown} are not tables of config.sample ({', '.join(_TABLE_KEYS)})")
        s = self.sample_settings
        if s.policy != "tables":
            raise ConfigError("policy values need config.sample.policy='tables'")
        return tables_policy(s.steps, **{k: values.get(k, getattr(s, k)) for k in _TABLE_KEYS})

    def sample_tokens(self, params: Params, labels: jax.Array, rng: jax.Array,
                      values: Optional[Dict[str, jax.Array]] = None) -> jax.Array:
        policy = self.policy if not values else self._policy_arrays(values)
        guided = self.use_guidance or "guidance" in (values or {})  # static: a searched guidance is always applied
        return generate_tokens(self.model, params, labels, rng, policy, guided)

    def sample_with_policy(self, params: Params, frozen: Any, labels: jax.Array, rng: jax.Array,
                           policy: Dict[str, jax.Array]) -> jax.Array:
        tokens = self.sample_tokens(params, labels, rng, policy)
        return self.tokenizer.decode(self.tokenizer_params(frozen), {"indices": tokens})

    def sample(self, params: Params, frozen: Any, labels: jax.Array, rng: jax.Array) -> jax.Array:
        tokens = self.sample_tokens(params, labels, rng)
        return self.tokenizer.decode(self.tokenizer_params(frozen), {"indices": tokens})
