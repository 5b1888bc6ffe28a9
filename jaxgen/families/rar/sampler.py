"""RAR's raster-order sampler (official `RAR.generate` with kv_cache=True): one compiled step in a lax loop.

The batch is doubled to [labels ; null class]. `prefill` runs [cls, cond] and gives the first token's logits; step t
mixes them with the power-cosine guidance scale of t (`jaxgen.sampling.guidance.power_cosine_scale`), divides by the
temperature and draws token t, then `decode_step` writes it into slot t + 2 of the FIXED-size KV cache and returns
the logits of token t + 1. No top-k / top-p (official). The cache never grows, so `decode_loop` traces the step once.

The adaLN modulations depend only on (label, slot), not on the tokens: an outer loop computes them for the next K
slots in one batched matmul per block and the inner loop's K steps read those rows, so each token no longer streams
the D x 6D modulation weights (a third of RAR's weights; decoding at small batch is bound by reading weights). K is
the largest divisor of L whose modulations fit in `modulation_bytes` (RAR-B at batch 2: 1.3 MB per slot, K = 64 in
96 MB; at batch 125 no chunk fits and each step computes its own, which costs nothing extra there: the weights are
read once per step for all rows anyway). Larger K also means larger matmuls: RAR-B's modulations take 1.1 s of a
sample at K = 16 (48 rows, ~120 GFLOP/s) and 0.54 s at K = 64 (192 rows) on the 2-core VM. Same numbers as computing
them per step, up to matmul summation order. The unconditional half's rows are all the null label: its modulations
are computed for one row and broadcast (4 -> 3 rows at batch 2). The chunk's Gumbel noise is drawn with them, in one
call (`step_noise`: the draws of the per-step keys, so the same tokens).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxgen.families.rar.model import PREFIX, RAR
from jaxgen.sampling import guidance
from jaxgen.sampling.buckets import chunk_within_budget
from jaxgen.sampling.filtering import sample_tokens, step_noise
from jaxgen.sampling.loop import decode_loop


def modulation_bytes_per_slot(model: RAR, params: Any, distinct_labels: jax.Array) -> int:
    """Bytes of every block's adaLN modulations for one cache slot of `distinct_labels` (shapes only)."""
    one = jax.eval_shape(lambda p, l: model.apply({"params": p}, l, jnp.zeros((1,), jnp.int32),
                                                  method=RAR.block_modulations), params, distinct_labels)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(one))


def generate_tokens(model: RAR, params: Any, labels: jax.Array, rng: jax.Array, guidance_scale: float = 16.0,
                    guidance_scale_pow: float = 2.75, temperature: float = 1.0,
                    modulation_bytes: int = 96 << 20) -> jax.Array:
    """labels (B,) -> token ids (B, L) int32 in raster order. `modulation_bytes`: room for the adaLN modulations of
    the slots computed together (see the module docstring); below one slot's worth, each step computes its own."""
    variables = {"params": params}
    b = labels.shape[0]
    seq = model.image_seq_len
    use_cfg = guidance.guided(guidance_scale, 1.0)
    labels = labels.astype(jnp.int32)
    labels_in = jnp.concatenate([labels, jnp.full_like(labels, model.null_label)]) if use_cfg else labels
    caches = model.apply(variables, labels_in.shape[0], method=RAR.init_cache)
    logits, caches = model.apply(variables, labels_in, caches, method=RAR.prefill)
    tables = {"scale": guidance.power_cosine_scale(jnp.arange(seq), seq, guidance_scale, guidance_scale_pow)}

    def step(t, state, scale, modulations=None, noise=None):
        tokens, logits, caches = state
        mixed = guidance.mix_halves(logits, scale) if use_cfg else logits
        key = jax.random.fold_in(rng, t) if noise is None else None  # noise drawn ahead is this key's draw
        _, token = sample_tokens(key, mixed, temperature=temperature, noise=noise)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, t, axis=1)
        token_in = jnp.concatenate([token, token]) if use_cfg else token
        # after the last token this computes logits nobody reads (one static step body for every t)
        logits, caches = model.apply(variables, token_in, t, labels_in, caches, modulations,
                                     method=RAR.decode_step)
        return tokens, logits, caches

    state = (jnp.zeros((b, seq), jnp.int32), logits, caches)
    distinct_labels = jnp.concatenate([labels, labels_in[b:b + 1]]) if use_cfg else labels
    chunk = chunk_within_budget(seq, modulation_bytes_per_slot(model, params, distinct_labels), modulation_bytes)
    if chunk <= 1:
        tokens, _, _ = decode_loop(lambda t, s, row: step(t, s, row["scale"]), state, seq, tables)
        return tokens

    def chunk_step(j, state, row):
        first = j * chunk
        mods = model.apply(variables, distinct_labels, first + PREFIX + jnp.arange(chunk),
                           method=RAR.block_modulations)
        noise = step_noise(rng, first + jnp.arange(chunk), (b, logits.shape[-1]))  # the chunk's draws at once

        def inner(k, s, r):
            mod_k = []
            for m in mods:  # one block's packed (B + 1 or B, K, 6D) -> its six (2B or B, 1, D) chunks of slot k
                chunks = jnp.split(jax.lax.dynamic_slice_in_dim(m, k, 1, axis=1), 6, axis=-1)
                if use_cfg:  # the unconditional half is one row (the null label) repeated: broadcast per slot and
                    # chunk, so the chunk's modulations are held for B + 1 rows, not 2B, and each expansion fuses
                    # into the op that reads it
                    chunks = [jnp.concatenate([c[:b], jnp.broadcast_to(c[b:], (b,) + c.shape[1:])]) for c in chunks]
                mod_k.append(tuple(chunks))
            return step(first + k, s, r["scale"], tuple(mod_k), noise[k])

        return decode_loop(inner, state, chunk, row)

    by_chunk = {"scale": tables["scale"].reshape(seq // chunk, chunk)}
    tokens, _, _ = decode_loop(chunk_step, state, seq // chunk, by_chunk)
    return tokens


def truncate_to_uint8_grid(images01: jax.Array) -> jax.Array:
    """[0, 1] images -> [-1, 1] images on the uint8 grid the official code produces by TRUNCATION
    (x * 255 cast to uint8), so jaxgen's rounding `to_uint8` gives exactly the official pixels."""
    q = jnp.floor(jnp.clip(images01, 0.0, 1.0) * 255.0) / 255.0
    return jnp.clip(q * 2.0 - 1.0, -1.0, 1.0)  # 255 / 255 * 2 - 1 can round to 1 + 1 ulp
