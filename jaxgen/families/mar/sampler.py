"""MAR's masked-autoregressive sampler (official `MAR.sample_tokens`), static shapes, one compiled loop.

All tokens start masked (value 0), one random order per sample. Step k runs the encoder + decoder on the current
tokens (with CFG: batch [tokens; tokens] with [class emb; fake_latent]); the still-masked count after the step comes
from the cosine schedule, which depends only on (L, num_iter), so it is a constant table indexed by the loop step; the
tokens predicted at step k are those of order rank in [after[k], before[k]) (the last step: all remaining). DiffLoss
samples them with the step's CFG scale.

The work per step follows the official one with static shapes: the visible count (L - before[k]) and the revealed
count (before[k] - after[k]) are known per step before tracing, so `jaxgen.sampling.buckets.size_buckets` groups
the steps into a few sizes and each step `lax.switch`es to the branch of its size:
- the encoder runs on the buffer + the last S tokens of the order (S = the step's encoder bucket >= its visible
  count; the masked ones among them are no keys), as the official runs on buffer + visible tokens only;
- the diffusion head samples K rows per image (K = the step's diffusion bucket >= its revealed count); with as many
  buckets as distinct counts (the default for the paper's 64 / 256 steps) that is exactly the revealed tokens.
  Rows beyond the count are independent draws that are thrown away, so the kept rows have the official
  distribution. The decoder runs on the full length, as official, except that its last block computes only the
  rows of the largest diffusion bucket (the others are keys only: the same z for the rows that are sampled).
The whole loop is ONE `jaxgen.sampling.loop.decode_loop`; only the taken branch of each switch runs. On XLA:CPU the
diffusion branches of `kernel_layout.MIN_ROWS` rows or more read out-major copies of the head's step kernels
(`jaxgen.nn.kernel_layout`), made once per call.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.diffusion.diffloss import diffloss_sample
from jaxgen.families.mar.model import MAR, embedded_denoiser, head_step_params, unpatchify
from jaxgen.nn import kernel_layout
from jaxgen.sampling import guidance
from jaxgen.sampling.buckets import size_buckets
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


def _encoder_cost(model: MAR):
    """Relative cost of an encoder pass over buffer + n tokens: dense ~24 D^2 and attention ~4 m D per token."""
    d = model.encoder_embed_dim

    def cost(n: int) -> float:
        m = model.buffer_size + n
        return m * (24.0 * d * d + 4.0 * m * d)
    return cost


def sampling_plan(model: MAR, num_iter: int, encoder_buckets: int = 8, diffusion_buckets: int = 16) -> dict:
    """Host-side per-step tables of a sample: before / after (still-masked counts), mask_len, the bucket sizes and
    each step's branch, and the work they imply per image (encoder tokens incl. buffer, diffusion rows)."""
    seq_len, buffer = model.seq_len, model.buffer_size
    mask_len, num_pred = mar_mask_schedule(seq_len, int(num_iter))
    before = np.concatenate([[seq_len], mask_len[:-1]]).astype(np.int32)
    # A model without buffer still needs one encoder row: the bucket then holds one (masked, keyless) token.
    visible = np.maximum(seq_len - before, 0 if buffer > 0 else 1)
    enc_sizes, enc_branch = size_buckets(visible, encoder_buckets, _encoder_cost(model))
    diff_sizes, diff_branch = size_buckets(num_pred, diffusion_buckets)
    return {"mask_len": mask_len, "num_pred": num_pred, "before": before,
            # after the last step nothing stays masked
            "after": np.concatenate([mask_len[:-1], [0]]).astype(np.int32),
            "encoder_sizes": enc_sizes, "encoder_branch": enc_branch,
            "diffusion_sizes": diff_sizes, "diffusion_branch": diff_branch,
            "encoder_tokens": int(sum(buffer + enc_sizes[i] for i in enc_branch)),
            "encoder_tokens_official": int(sum(buffer + seq_len - before)),
            "diffusion_rows": int(sum(diff_sizes[i] for i in diff_branch)),
            "diffusion_rows_official": int(num_pred.sum())}


def sample_latents(model: MAR, params: Any, labels: jax.Array, rng: jax.Array, diffusion, num_iter: int,
                   cfg: float = 1.0, cfg_schedule: str = "linear", temperature: float = 1.0,
                   encoder_buckets: int = 8, diffusion_buckets: int = 16,
                   modulation_bytes: int = 64 << 20) -> jax.Array:
    """-> latents (B, h, w, z) NHWC in the scaled token space. `diffusion`: the respaced generation diffusion.

    `encoder_buckets` / `diffusion_buckets`: most compiled sizes for the encoder's tokens and the diffusion head's
    rows (see the module docstring); more buckets = less padded work, more compile time. `modulation_bytes`: room
    for the head's adaLN modulations of several DDPM steps (`diffloss_sample`)."""
    num_iter = int(num_iter)
    use_cfg = guidance.guided(cfg, 1.0)
    seq_len, tdim, buffer = model.seq_len, model.token_dim, model.buffer_size
    b = labels.shape[0]
    variables = {"params": params}

    plan = sampling_plan(model, num_iter, encoder_buckets, diffusion_buckets)
    enc_sizes, diff_sizes = plan["encoder_sizes"], plan["diffusion_sizes"]
    tables = {"before": plan["before"], "after": plan["after"],
              "scale": guidance.mar_scales(plan["mask_len"], seq_len, cfg, cfg_schedule),
              "encoder_branch": plan["encoder_branch"], "diffusion_branch": plan["diffusion_branch"]}

    rng_order, rng_loop = jax.random.split(rng)
    orders, ranks = random_orders(rng_order, b, seq_len)
    cond = model.apply(variables, labels.astype(jnp.int32), method=MAR.class_embedding)
    copies = 2 if use_cfg else 1  # with CFG every row is run for [class; null class]
    if use_cfg:
        cond = jnp.concatenate([cond, model.apply(variables, b, method=MAR.null_embedding)], axis=0)
    orders_in = jnp.tile(orders, (copies, 1))
    buffer_index = jnp.broadcast_to(jnp.arange(buffer, dtype=jnp.int32), (b * copies, buffer))

    def encode(size: int):
        """Encoder on buffer + the last `size` tokens of the order (all visible ones are among them)."""
        def run(tok_in, mask_in):
            keep = None if size >= seq_len else \
                jnp.concatenate([buffer_index, buffer + orders_in[:, seq_len - size:]], axis=1)
            return model.apply(variables, tok_in, mask_in, cond, False, None, keep, method=MAR.forward_mae_encoder)
        return run

    rows = jnp.arange(b)[:, None]
    most = max(diff_sizes)  # the decoder returns z of the tokens of rank after .. after + most - 1

    def predicted_positions(t):
        """(B, most) positions of order rank after .. after + most - 1 (clipped at L - 1), and which are revealed."""
        rank = t["after"] + jnp.arange(most, dtype=jnp.int32)[None, :]
        pos = jnp.take_along_axis(orders, jnp.broadcast_to(jnp.minimum(rank, seq_len - 1), (b, most)), axis=1)
        return pos, jnp.broadcast_to(rank < t["before"], (b, most))

    # Branches sampling many rows read out-major copies of the head's step kernels, made once here (kernel_layout).
    out_major = [kernel_layout.wanted(n * b * copies) for n in diff_sizes]
    out_major_params = head_step_params(params) if any(out_major) else None
    denoisers = [embedded_denoiser(model, variables, use_cfg, out_major_params if o else None) for o in out_major]

    def diffuse(size: int, denoiser):
        """Sample the first `size` of the decoder's rows per image (beyond the step's count: dropped), and write the
        valid ones into the tokens."""
        def run(z, pos, valid, tokens, t, step_rng):
            pos, valid = pos[:, :size], valid[:, :size]
            zsel = z[:, :size].reshape(-1, z.shape[-1])  # with CFG: [cond rows; uncond rows]
            if use_cfg:
                sampled = diffloss_sample(denoiser, zsel, step_rng, diffusion, temperature=temperature,
                                          cfg=t["scale"], guided=True, channels=tdim,
                                          modulation_bytes=modulation_bytes)[: b * size]  # drop null half
            else:
                sampled = diffloss_sample(denoiser, zsel, step_rng, diffusion, temperature=temperature, guided=False,
                                          channels=tdim, modulation_bytes=modulation_bytes)
            sampled = sampled.reshape(b, size, tdim).astype(tokens.dtype)
            # Invalid slots scatter out of bounds and are dropped.
            return tokens.at[rows, jnp.where(valid, pos, seq_len)].set(sampled, mode="drop")
        return run

    def step(k, tokens, t):
        mask = (ranks < t["before"]).astype(jnp.float32)  # 1 = still masked
        tok_in, mask_in = (jnp.concatenate([tokens, tokens]), jnp.concatenate([mask, mask])) if use_cfg \
            else (tokens, mask)
        enc = jax.lax.switch(t["encoder_branch"], [encode(n) for n in enc_sizes], tok_in, mask_in)
        pos, valid = predicted_positions(t)
        z = model.apply(variables, enc, mask_in, False, jnp.tile(pos, (copies, 1)),
                        method=MAR.forward_mae_decoder)  # (B or 2B, most, D)
        branches = [diffuse(n, d) for n, d in zip(diff_sizes, denoisers)]
        return jax.lax.switch(t["diffusion_branch"], branches, z, pos, valid, tokens, t,
                              jax.random.fold_in(rng_loop, k))

    tokens = decode_loop(step, jnp.zeros((b, seq_len, tdim), jnp.float32), num_iter, tables)
    return unpatchify(tokens, model.patch_size, model.vae_embed_dim)
