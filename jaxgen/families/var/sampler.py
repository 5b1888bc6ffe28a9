"""VAR's KV-cached, classifier-free-guided next-scale sampler (the official `autoregressive_infer_cfg`).

The batch is doubled to [labels ; null class]. Scale si runs only its own pn^2 tokens through the blocks, attending to
the cached keys / values of every coarser scale (equivalent to the block-causal mask). Guidance ramps linearly:
t = cfg * si / (S - 1), logits = (1 + t) cond - t uncond (scale 0 unguided). Sampling uses the official top-k / top-p
semantics. The scale count is static, so the Python loop over scales unrolls inside ONE jit (each scale has its own
shapes); nothing re-traces across calls with the same batch size and settings.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from jaxgen.families.var.model import VAR
from jaxgen.tokenizers.msvq import VQVAE


def top_k_top_p_filter(logits: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
    """Official `sample_with_top_k_top_p_` masking (returns the logits with removed entries at -inf).

    top_k > 0: drop every logit strictly below the k-th largest (ties with it are kept).
    top_p > 0: sort ascending, drop tokens whose ascending cumulative probability is <= 1 - top_p; the top token
    always stays.
    """
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(int(top_k), v))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p > 0:
        order = jnp.argsort(logits, axis=-1)  # ascending
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        remove_sorted = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) <= (1.0 - top_p)
        remove_sorted = remove_sorted.at[..., -1].set(False)
        remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def sample_tokens(rng: jax.Array, logits: jax.Array, top_k: int = 0, top_p: float = 0.0):
    """(filtered logits, sampled ids) for logits (B, l, V)."""
    filtered = top_k_top_p_filter(logits, top_k, top_p)
    if top_k == 1:
        return filtered, jnp.argmax(filtered, axis=-1).astype(jnp.int32)  # deterministic: the single survivor
    return filtered, jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def autoregressive_infer_cfg(model: VAR, vae: VQVAE, params: Any, vae_params: Any, labels: jax.Array, rng: jax.Array,
                             cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
                             return_details: bool = False):
    """Class-conditional samples. labels (B,) int (the null class num_classes gives unconditional samples).

    Returns images NHWC float32 in [-1, 1] (the official output before its (x+1)/2), or with return_details a dict with
    'image', 'idx' (B, L) int32, 'logits' (B, L, V) after the CFG mix and before filtering.
    Call it inside jit (see `make_sampler`); model / vae / top_k / top_p / more_smooth are static.
    """
    variables = {"params": params}
    vvars = {"params": vae_params}
    b = labels.shape[0]
    pns = tuple(model.patch_nums)
    n = len(pns)
    labels = labels.astype(jnp.int32)
    labels2 = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])
    cond, cond_blocks = model.apply(variables, labels2, method=VAR.cond_features)
    tokens = model.apply(variables, cond, method=VAR.first_tokens)
    size = pns[-1]
    f_hat = jnp.zeros((b, size, size, vae.z_channels), jnp.float32)
    codebook = vae_params["codebook"].astype(jnp.float32)
    cache = None
    all_idx, all_logits = [], []
    for si, pn in enumerate(pns):
        ratio = si / (n - 1) if n > 1 else 1.0
        x, cache = model.apply(variables, tokens, cond_blocks, cache, method=VAR.blocks_step)
        logits = model.apply(variables, x, cond, method=VAR.logits_from)
        t = cfg * ratio
        logits = (1.0 + t) * logits[:b] - t * logits[b:]
        rng, k_sample, k_gumbel = jax.random.split(rng, 3)
        filtered, idx = sample_tokens(k_sample, logits, top_k, top_p)
        all_idx.append(idx)
        all_logits.append(logits)
        if not more_smooth:
            h = jnp.take(codebook, idx, axis=0)
        else:
            # visualisation-only smoothing: Gumbel-softmax weights over the (filtered) logits, tau annealed with scale
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            g = jax.random.gumbel(k_gumbel, filtered.shape, jnp.float32)
            w = jax.nn.softmax((filtered * (1 + ratio) + g) / tau, axis=-1)
            h = jnp.einsum("blv,vc->blc", w, codebook, precision=jax.lax.Precision.HIGHEST)
        h = h.reshape(b, pn, pn, vae.z_channels)
        f_hat, nxt = vae.apply(vvars, si, f_hat, h, method=VQVAE.next_ar_input)
        if si != n - 1:
            pn_next = pns[si + 1]
            nxt = model.apply(variables, si + 1, nxt.reshape(b, pn_next * pn_next, vae.z_channels),
                              method=VAR.scale_tokens)
            tokens = jnp.concatenate([nxt, nxt], axis=0)  # the same input for the cond and uncond halves
    image = vae.apply(vvars, f_hat, method=VQVAE.fhat_to_img)
    if return_details:
        return {"image": image, "idx": jnp.concatenate(all_idx, 1), "logits": jnp.concatenate(all_logits, 1)}
    return image


def make_sampler(model: VAR, vae: VQVAE, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                 more_smooth: bool = False, return_details: bool = False):
    """jit-compiled sampler(params, vae_params, labels, rng); compiled once per batch size."""
    fn = functools.partial(autoregressive_infer_cfg, model, vae, cfg=cfg, top_k=top_k, top_p=top_p,
                           more_smooth=more_smooth, return_details=return_details)
    return jax.jit(lambda params, vae_params, labels, rng: fn(params, vae_params, labels, rng))
