"""Parallel decoding (MaskGIT / AutoNAT `generate`): T steps of one compiled body in a lax loop over a state.

Step t, from ids (B, L) with mask_id at the masked positions:
  logits   = cond + w_t (cond - uncond)   (one call on [ids; ids] with [labels; null] when the policy guides)
  draw     ~ Categorical(logits / max(sample_temp_t, 1e-4)); sampled = where(masked, draw, ids)
  conf     = log_softmax(logits)[sampled] (UNtempered) for masked tokens, +inf for fixed ones, + remask_temp_t * Gumbel
  mask_len = clamp(floor(L * ratio_t), 1, masked_before - 1); the mask_len lowest confidences are re-masked
The result is the last step's `sampled`. `masked_before` is carried as a scalar: every row starts fully masked and
re-masks exactly mask_len tokens per step (confidences are continuous, so ties have probability 0), which is the
official count (AutoNAT takes row 0's, MaskGIT each row's; they agree) without a cross-device reduction per step.
"""
from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp

from jaxgen.families.nat.policy import MIN_SAMPLE_TEMP
from jaxgen.sampling.loop import decode_loop


def remask_update(ids, logits, draws, gumbel, ratio, remask_temp, masked_before, mask_id: int) -> Dict[str, Any]:
    """One decoding update with given draws (the sampler passes random ones; parity passes recorded ones).

    ids, draws (B, L) int; logits (B, L, V) guided, untempered; gumbel (B, L); ratio, remask_temp, masked_before
    scalars (traced). Returns sampled_ids, logprob, confidence, mask_len, remask (bool), ids (the next input)."""
    seq_len = ids.shape[-1]
    is_mask = ids == mask_id
    sampled = jnp.where(is_mask, draws.astype(jnp.int32), ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, draws.astype(jnp.int32)[..., None], axis=-1)[..., 0]
    logprob = jnp.where(is_mask, picked, jnp.inf)
    mask_len = jnp.floor(jnp.float32(seq_len) * jnp.asarray(ratio, jnp.float32)).astype(jnp.int32)
    mask_len = jnp.maximum(1, jnp.minimum(jnp.asarray(masked_before, jnp.int32) - 1, mask_len))
    confidence = logprob + jnp.asarray(remask_temp, jnp.float32) * gumbel.astype(jnp.float32)
    cutoff = jnp.take_along_axis(jnp.sort(confidence, axis=-1),
                                 jnp.broadcast_to(mask_len - 1, (ids.shape[0], 1)), axis=-1)
    remask = confidence <= cutoff
    return {"sampled_ids": sampled, "logprob": logprob, "confidence": confidence, "mask_len": mask_len,
            "remask": remask, "ids": jnp.where(remask, mask_id, sampled)}


def guided_logits(model, params, ids, labels, guidance, use_guidance: bool):
    """cond + w (cond - uncond) (AutoNAT cfg_nnet), or the conditional logits when the policy never guides."""
    variables = {"params": params}
    if not use_guidance:
        return model.apply(variables, ids, labels)
    both = model.apply(variables, jnp.concatenate([ids, ids]), jnp.concatenate(
        [labels, jnp.full_like(labels, model.null_label)]))
    cond, uncond = jnp.split(both, 2)
    return cond + jnp.asarray(guidance, jnp.float32) * (cond - uncond)


def generate_tokens(model, params, labels: jax.Array, rng: jax.Array, policy: Dict[str, jax.Array],
                    use_guidance: bool) -> jax.Array:
    """labels (B,) -> token ids (B, L) int32. `policy`: the four (T,) arrays of `jaxgen.families.nat.policy`
    (traced: any values, one compiled loop per T)."""
    if use_guidance and model.null_label is None:
        raise ValueError(f"{type(model).__name__} has no null class: classifier-free guidance is not available")
    labels = jnp.asarray(labels, jnp.int32)
    b, seq = labels.shape[0], model.image_seq_len
    steps = int(jnp.shape(policy["mask_ratio"])[0])

    def step(t, state, row):
        ids, masked_before, _ = state
        logits = guided_logits(model, params, ids, labels, row["guidance"], use_guidance)
        k_draw, k_gumbel = jax.random.split(jax.random.fold_in(rng, t))
        temp = jnp.maximum(row["sample_temp"], MIN_SAMPLE_TEMP)
        draws = jax.random.categorical(k_draw, logits / temp, axis=-1)
        gumbel = jax.random.gumbel(k_gumbel, (b, seq), jnp.float32)
        out = remask_update(ids, logits, draws, gumbel, row["mask_ratio"], row["remask_temp"], masked_before,
                            model.mask_id)
        return out["ids"], out["mask_len"], out["sampled_ids"]

    init = (jnp.full((b, seq), model.mask_id, jnp.int32), jnp.asarray(seq, jnp.int32),
            jnp.zeros((b, seq), jnp.int32))
    _, _, tokens = decode_loop(step, init, steps, {k: policy[k] for k in ("mask_ratio", "remask_temp",
                                                                           "sample_temp", "guidance")})
    return tokens
