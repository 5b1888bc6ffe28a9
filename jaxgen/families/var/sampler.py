"""VAR's KV-cached, classifier-free-guided next-scale sampler (the official `autoregressive_infer_cfg`).

The batch is doubled to [labels ; null class]. Scale si runs only its own pn^2 tokens through the blocks, attending to
the cached keys / values of every coarser scale (equivalent to the block-causal mask). Guidance ramps linearly over the
scales (`jaxgen.sampling.guidance.var_scales`: t = cfg * si / (S - 1), logits = (1 + t) cond - t uncond); tokens are
drawn with the official top-k / top-p semantics (`jaxgen.sampling.filtering`). The scale count is static and each
scale has its own shapes, so the Python loop over scales unrolls inside ONE jit; nothing re-traces across calls with
the same batch size and settings.

The tokenizer is used only through its family (`MSVQFamily`: codebook, next_ar_input, decode of {'features'}).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxgen.families.var.model import VAR
from jaxgen.sampling import guidance
from jaxgen.sampling.filtering import sample_tokens


def autoregressive_infer_cfg(model: VAR, tokenizer, params: Any, tok_params: Any, labels: jax.Array, rng: jax.Array,
                             cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
                             return_details: bool = False):
    """Class-conditional samples. labels (B,) int (the null class num_classes gives unconditional samples).

    Returns images NHWC float32 in [-1, 1] (the official output before its (x+1)/2), or with return_details a dict with
    'image', 'idx' (B, L) int32, 'logits' (B, L, V) after the CFG mix and before filtering.
    Call it inside jit; model / tokenizer / top_k / top_p / more_smooth are static.
    """
    variables = {"params": params}
    b = labels.shape[0]
    pns = tuple(model.patch_nums)
    n = len(pns)
    zc = model.cvae
    scales = guidance.var_scales(n, cfg)
    labels = labels.astype(jnp.int32)
    labels2 = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])
    cond, cond_blocks = model.apply(variables, labels2, method=VAR.cond_features)
    tokens = model.apply(variables, cond, method=VAR.first_tokens)
    size = pns[-1]
    f_hat = jnp.zeros((b, size, size, zc), jnp.float32)
    codebook = tokenizer.codebook(tok_params)
    cache = None
    all_idx, all_logits = [], []
    for si, pn in enumerate(pns):
        ratio = si / (n - 1) if n > 1 else 1.0
        x, cache = model.apply(variables, tokens, cond_blocks, cache, method=VAR.blocks_step)
        logits = guidance.mix_halves(model.apply(variables, x, cond, method=VAR.logits_from), scales[si])
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
        h = h.reshape(b, pn, pn, zc)
        f_hat, nxt = tokenizer.next_ar_input(tok_params, si, f_hat, h)
        if si != n - 1:
            pn_next = pns[si + 1]
            nxt = model.apply(variables, si + 1, nxt.reshape(b, pn_next * pn_next, zc), method=VAR.scale_tokens)
            tokens = jnp.concatenate([nxt, nxt], axis=0)  # the same input for the cond and uncond halves
    image = tokenizer.decode(tok_params, {"features": f_hat})
    if return_details:
        return {"image": image, "idx": jnp.concatenate(all_idx, 1), "logits": jnp.concatenate(all_logits, 1)}
    return image
