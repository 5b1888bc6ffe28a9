"""MAR's masked-autoregressive sampler (official `MAR.sample_tokens`), static shapes, one compiled step.

All tokens start masked (value 0), one random order per sample. Step k runs the encoder + decoder on the current
tokens (with CFG: batch [tokens; tokens] with [class emb; fake_latent]); the still-masked count after the step comes
from the cosine schedule, which depends only on (L, num_iter), so it is a constant table indexed by the loop step; the
tokens predicted at step k are those of order rank in [after[k], before[k]) (the last step: all remaining). DiffLoss
samples them with the step's CFG scale.

Static shapes: each step samples K = max_k(#predicted at step k) rows per image (gathered by order rank; slots beyond
the step's count are computed and discarded). The official code samples exactly the predicted rows; the extra rows
are independent draws that are thrown away, so the kept rows have the same distribution, and with num_iter = L this is
one row per image per step, as official. The whole loop is ONE `jaxgen.sampling.loop.decode_loop`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion.diffloss import diffloss_sample
from jaxgen.families.mar.model import MAR, unpatchify
from jaxgen.sampling import guidance
from jaxgen.sampling.loop import decode_loop
from jaxgen.sampling.schedules import mar_mask_schedule


def random_orders(rng: jax.Array, batch: int, seq_len: int):
    """Per-row uniformly random generation orders.

    Returns (orders, ranks), both (B, L) int32: orders[b, i] = position generated i-th; ranks = its inverse
    (ranks[b, pos] = i). "The first n of the order" is then simply `ranks < n`, a static-shape mask for a dynamic n.
    """
    orders = jnp.argsort(jax.random.uniform(rng, (batch, seq_len)), axis=1).astype(jnp.int32)
    ranks = jnp.argsort(orders, axis=1).astype(jnp.int32)
    return orders, ranks


def sample_latents(model: MAR, params: Any, labels: jax.Array, rng: jax.Array, diffusion, num_iter: int,
                   cfg: float = 1.0, cfg_schedule: str = "linear", temperature: float = 1.0) -> jax.Array:
    """-> latents (B, h, w, z) NHWC in the scaled token space. `diffusion`: the respaced generation diffusion."""
    num_iter = int(num_iter)
    use_cfg = guidance.guided(cfg, 1.0)
    seq_len, tdim = model.seq_len, model.token_dim
    b = labels.shape[0]
    variables = {"params": params}

    mask_len, num_pred = mar_mask_schedule(seq_len, num_iter)
    k_slots = int(np.max(num_pred))
    # Still-masked count before / after each step; after the last step nothing stays masked.
    tables = {"before": np.concatenate([[seq_len], mask_len[:-1]]).astype(np.int32),
              "after": np.concatenate([mask_len[:-1], [0]]).astype(np.int32),
              "scale": guidance.mar_scales(mask_len, seq_len, cfg, cfg_schedule)}

    rng_order, rng_loop = jax.random.split(rng)
    orders, ranks = random_orders(rng_order, b, seq_len)
    cond = model.apply(variables, labels.astype(jnp.int32), method=MAR.class_embedding)
    if use_cfg:
        cond = jnp.concatenate([cond, model.apply(variables, b, method=MAR.null_embedding)], axis=0)

    def mae(mdl, tokens, mask, class_emb):
        return mdl.forward_mae_decoder(mdl.forward_mae_encoder(tokens, mask, class_emb, train=False), mask,
                                       train=False)

    rows = jnp.arange(b)[:, None]
    slot = jnp.arange(k_slots, dtype=jnp.int32)[None, :]

    def step(k, tokens, t):
        mask = (ranks < t["before"]).astype(jnp.float32)  # 1 = still masked
        tok_in, mask_in = (jnp.concatenate([tokens, tokens]), jnp.concatenate([mask, mask])) if use_cfg \
            else (tokens, mask)
        z = model.apply(variables, tok_in, mask_in, cond, method=mae)  # (B or 2B, L, D)

        # Positions predicted now: order ranks after .. before-1, gathered into K static slots.
        rank = t["after"] + slot  # (1, K)
        valid = jnp.broadcast_to(rank < t["before"], (b, k_slots))
        pos = jnp.take_along_axis(orders, jnp.broadcast_to(jnp.minimum(rank, seq_len - 1), (b, k_slots)), axis=1)
        zsel = jnp.take_along_axis(z, jnp.tile(pos, (z.shape[0] // b, 1))[..., None], axis=1)
        zsel = zsel.reshape(-1, z.shape[-1])  # with CFG: [cond rows; uncond rows]
        step_rng = jax.random.fold_in(rng_loop, k)
        if use_cfg:
            def net(x_t, tt, c, scale):
                return model.apply(variables, x_t, tt, c, scale, method=MAR.denoise_with_cfg)
            sampled = diffloss_sample(net, zsel, step_rng, diffusion, temperature=temperature, cfg=t["scale"],
                                      guided=True, channels=tdim)[: b * k_slots]  # drop the null-class half
        else:
            def net(x_t, tt, c):
                return model.apply(variables, x_t, tt, c, method=MAR.denoise)
            sampled = diffloss_sample(net, zsel, step_rng, diffusion, temperature=temperature, guided=False,
                                      channels=tdim)
        sampled = sampled.reshape(b, k_slots, tdim).astype(tokens.dtype)
        # Invalid slots scatter out of bounds and are dropped.
        return tokens.at[rows, jnp.where(valid, pos, seq_len)].set(sampled, mode="drop")

    tokens = decode_loop(step, jnp.zeros((b, seq_len, tdim), jnp.float32), num_iter, tables)
    return unpatchify(tokens, model.patch_size, model.vae_embed_dim)
