"""Counted FLOPs of the OFFICIAL work of a sampling call, for GFLOP/s next to the times (the same count divides
both sides' seconds). Matmuls only (2 m n k, attention QK^T and AV included); norms, activations and sampling are
left out, so achieved GFLOP/s are slight underestimates.

Samplers built on a lax loop (MAR, RAR) are counted here, since XLA counts a loop body once; VAR's (unrolled over
its scales) too, since XLA's count leaves out jaxgen's CPU kernels (custom calls); its VQVAE decode is XLA's count
of the decoder alone, lowered with plain convolutions (the official's work; jaxgen's Winograd kernel does fewer). Train steps too (`train_flops`: model FLOPs, the MFU convention; on a GPU XLA's count misses cuDNN attention).
"""
from __future__ import annotations

import os
from unittest import mock


def transformer(tokens: int, pairs: int, dim: int, mlp_dim: int, depth: int, extra_per_token: int = 0) -> float:
    """`tokens` rows through `depth` pre-norm blocks; `pairs` = sum over rows of the keys each attends to."""
    dense = 2.0 * tokens * (4 * dim * dim + 2 * dim * mlp_dim + extra_per_token)
    return depth * (dense + 4.0 * pairs * dim)


def diffusion_head_row(model) -> float:
    """One SimpleMLPAdaLN call on one row, as the official runs it (time and condition embeddings per row)."""
    w, c, dd, f = model.diffloss_w, model.token_dim, model.decoder_embed_dim, 256
    embed = 2.0 * (c * w + f * w + w * w + dd * w)
    blocks = model.diffloss_d * 2.0 * (3 * w * w + 2 * w * w)
    final = 2.0 * (2 * w * w + w * 2 * c)
    return embed + blocks + final


def mar_sample(model, num_iter: int, batch: int, cfg: bool, ddpm_steps: int) -> float:
    """Official `sample_tokens`: encoder on buffer + visible, decoder on buffer + L, head on the revealed rows."""
    from jaxgen.families.mar.sampler import sampling_plan

    plan = sampling_plan(model, num_iter)
    copies = batch * (2 if cfg else 1)
    d, dd, buf, seq = model.encoder_embed_dim, model.decoder_embed_dim, model.buffer_size, model.seq_len
    total = 0.0
    for before in plan["before"]:
        m = buf + seq - int(before)
        total += transformer(m, m * m, d, int(d * model.mlp_ratio), model.encoder_depth)
        n = buf + seq
        total += transformer(n, n * n, dd, int(dd * model.mlp_ratio), model.decoder_depth) + 2.0 * n * d * dd
    total *= copies
    total += copies * plan["diffusion_rows_official"] * ddpm_steps * diffusion_head_row(model)
    return total


def rar_sample(model, batch: int, cfg: bool) -> float:
    """Official `generate(kv_cache=True)`: [cls, cond] then one token per step (255 fed), adaLN per token."""
    d, seq = model.hidden_size, model.image_seq_len
    tokens = seq + 1
    pairs = tokens * (tokens + 1) // 2
    body = transformer(tokens, pairs, d, model.mlp_dim, model.depth, extra_per_token=6 * d * d)
    head = seq * 2.0 * (d * 2 * d + d * model.codebook_size)
    return batch * (2 if cfg else 1) * (body + head)


def var_sample(family, batch: int) -> float:
    """Official `autoregressive_infer_cfg` (always 2 x batch copies: conditional and unconditional): 680 tokens per copy through the KV-cached blocks (each scale attends to
    every token up to its own end), word embedding and head per token, ada_lin per block and scale; then the VQVAE
    decode of the final f_hat (XLA's count of the decoder)."""
    import jax
    import jax.numpy as jnp

    from jaxgen.families.var.model import block_causal_mask
    from jaxgen.kernels import cpu as cpu_kernels
    from jaxgen.train import restore

    m = family.model
    c, seq, scales = m.embed_dim, m.seq_len, len(m.patch_nums)
    pairs = float(block_causal_mask(m.patch_nums).sum())
    body = transformer(seq, pairs, c, int(round(c * m.mlp_ratio)), m.depth)
    body += 2.0 * seq * (c * m.vocab_size + m.cvae * c) + scales * 2.0 * (m.depth * 6 + 2) * c * c
    side = m.patch_nums[-1]
    features = jax.ShapeDtypeStruct((batch, side, side, m.cvae), jnp.float32)
    tok = family.tokenizer
    # XLA counts no custom call: the decoder lowered with plain convolutions (Winograd's kernel opted out)
    with mock.patch.dict(os.environ, {cpu_kernels.WINOGRAD_OPT_OUT: "0"}):
        cost = jax.jit(lambda p, f: tok.decode(p, {"features": f})).lower(restore.abstract_params(tok), features)
    cost = cost.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return 2 * batch * body + float(cost["flops"])


def sample_flops(family, what: str, batch: int):
    """Counted FLOPs of one sampling call of `family` at `batch`, or None where XLA's count is exact (no loop)."""
    s = family.sample_settings
    if family.name == "mar":
        return mar_sample(family.model, s.num_iter, batch, float(s.cfg) != 1.0, family.gen_diffusion.num_timesteps)
    if family.name == "rar" and what == "sample_tokens":
        return rar_sample(family.model, batch, float(s.guidance_scale) != 1.0)
    if family.name == "var" and what == "sample":
        return var_sample(family, batch)
    return None


def _mar_expected_visible(model) -> float:
    """Official training: mask ratio ~ TruncNormal(mean 1, std 0.25) on [mask_ratio_min, 1]; expected visible count."""
    from scipy import stats

    from jaxgen.families.mar.family import MASK_RATIO_MEAN, MASK_RATIO_STD

    lo = (model.mask_ratio_min - MASK_RATIO_MEAN) / MASK_RATIO_STD
    hi = (1.0 - MASK_RATIO_MEAN) / MASK_RATIO_STD
    ratio = stats.truncnorm(lo, hi, loc=MASK_RATIO_MEAN, scale=MASK_RATIO_STD).mean()
    return model.seq_len * (1.0 - ratio)


def train_flops(family, batch: int):
    """Model FLOPs of one train step: 3 x the forward's matmuls (forward + backward, no recomputation), on the work
    the model needs (causal / block-causal attention pairs, MAR's encoder on buffer + the expected visible tokens),
    the usual MFU count. On a GPU, XLA's own count of the step leaves out cuDNN's attention (a custom call)."""
    import numpy as np

    m = family.model
    if family.name == "var":
        from jaxgen.families.var.model import block_causal_mask

        c, seq = m.embed_dim, m.seq_len
        pairs = float(block_causal_mask(m.patch_nums).sum())
        fwd = transformer(seq, pairs, c, int(round(c * m.mlp_ratio)), m.depth)
        fwd += 2.0 * seq * (c * m.vocab_size + m.cvae * c) + 2.0 * (m.depth * 6 + 2) * c * c  # head, embed, ada_lin
    elif family.name == "rar":
        d, n = m.hidden_size, m.image_seq_len + 2  # cls, condition, tokens
        fwd = transformer(n, n * (n + 1) / 2, d, m.mlp_dim, m.depth, extra_per_token=6 * d * d)
        fwd += (n - 1) * 2.0 * (d * 2 * d + d * m.codebook_size)
    elif family.name == "mar":
        d, dd, buf, seq = m.encoder_embed_dim, m.decoder_embed_dim, m.buffer_size, m.seq_len
        enc = buf + _mar_expected_visible(m)
        dec = buf + seq
        fwd = transformer(enc, enc * enc, d, int(d * m.mlp_ratio), m.encoder_depth) + 2.0 * enc * m.token_dim * d
        fwd += transformer(dec, dec * dec, dd, int(dd * m.mlp_ratio), m.decoder_depth) + 2.0 * dec * d * dd
        fwd += seq * m.diffusion_batch_mul * diffusion_head_row(m)
    else:
        return None
    return float(np.float64(3.0 * batch * fwd))
