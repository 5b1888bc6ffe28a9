"""The RAR transformer (bytedance/1d-tokenizer modeling/rar.py) in linen.

A decoder-only causal transformer over image tokens. Sequence = [cls, cond, t_o(0), ..., t_o(L-1)] (L + 2 slots) for
an order o (a permutation of the L raster positions; raster = identity). The output at cond predicts t_o(0), the
output at t_o(i) predicts t_o(i+1); the output at cls is dropped.

- One embedding table of codebook_size + 1 + num_classes + 1 rows: codes, the (unused) mask id, the classes at
  label + codebook_size + 1 and the null class last. Here a label is a class id in [0, num_classes] with
  label == num_classes the null (unconditional) class, so `condition_ids` is a single add.
- pos_embed: rows 0, 1 for cls / cond; the token at original position p gets row 2 + p (it moves with the token).
- target_aware_pos_embed: tells each slot which position it predicts: cls 0, cond row 2 + o(0), the token in
  permuted slot i row 2 + o(i+1), the last token 0.
- adaLN conditioning per sequence slot j: emb(cond) + timesteps_embeddings[j] (j = slot, not shuffled).
- Blocks: adaLN-Zero (`AdaLNZeroBlock`, norm1/norm2 WITH affine, QK-LayerNorm, qkv bias, exact GELU); head:
  affine-free LayerNorm modulated (scale, shift) then lm_head.

Param tree (torch name in brackets): cls_token, pos_embed, target_aware_pos_embed, timesteps_embeddings,
embeddings/embedding [embeddings.weight], blocks_{i}/{norm1, attn/{qkv, q_norm, k_norm, proj}, norm2, mlp/{fc1, fc2},
adaLN_modulation [adaLN_modulation.1]}, adaln_before_head/adaLN_modulation [adaln_before_head.adaLN_modulation.1],
lm_head.

Sampling runs in raster order with a FIXED-size KV cache (`init_cache`, `prefill`, `decode_step`): slot j of the
cache holds sequence slot j, so one compiled `decode_step` serves every position inside `lax.fori_loop`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen import strict
from jaxgen.nn.attention import KVCache
from jaxgen.nn.dropout import drop_labels
from jaxgen.nn.layers import Dense, Dtype, Embed, constrain, with_axes
from jaxgen.nn.transformer import AdaLNFinalNorm, AdaLNZeroBlock

# Official sizes (README_RAR.md; XXL's MLP is not 4x).
RAR_SIZES = {
    "b": dict(depth=24, hidden_size=768, mlp_dim=3072, num_heads=16),
    "l": dict(depth=24, hidden_size=1024, mlp_dim=4096, num_heads=16),
    "xl": dict(depth=32, hidden_size=1280, mlp_dim=5120, num_heads=16),
    "xxl": dict(depth=40, hidden_size=1408, mlp_dim=6144, num_heads=16),
}

# Extra rows of the learned tables beyond image_seq_len (official sizes; only the first L + 2 are ever used).
POS_EXTRA_ROWS = 1024
TIMESTEP_EXTRA_ROWS = 100
PREFIX = 2  # cls, cond

# torch nn.init.trunc_normal_(std=0.02) truncates at +-2 ABSOLUTE (100 std): a plain normal for all purposes.
_normal02 = nn.initializers.normal(0.02)

Caches = Tuple[KVCache, ...]


def shuffle_tokens(tokens, orders):
    """tokens (B, L) in raster order -> permuted (B, L): slot i holds tokens[orders[i]] (the shuffled targets)."""
    return jnp.take_along_axis(tokens, orders.astype(jnp.int32), axis=1)


def sample_orders(rng, batch: int, seq_len: int, random_ratio):
    """Official `sample_orders`: each row independently a random permutation with probability random_ratio, else
    raster. Returns (B, seq_len) int32."""
    pick, perm = jax.random.split(rng)
    raster = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    shuffled = jnp.argsort(jax.random.uniform(perm, (batch, seq_len)), axis=1).astype(jnp.int32)
    use = jax.random.uniform(pick, (batch, 1)) < random_ratio
    return jnp.where(use, shuffled, raster)


class RAR(nn.Module):
    hidden_size: int = 768
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 3072
    codebook_size: int = 1024
    num_classes: int = 1000
    image_seq_len: int = 256
    dropout: float = 0.1  # after attn.proj and inside the MLP (timm proj_drop)
    attn_dropout: float = 0.1
    class_drop_prob: float = 0.1  # official class_label_dropout
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    # ---- static sizes / ids ---------------------------------------------------------------------------------------
    @property
    def num_embeddings(self) -> int:
        return self.codebook_size + 1 + self.num_classes + 1

    @property
    def null_label(self) -> int:
        """The label of the null (unconditional) class; its condition id is the table's last row."""
        return self.num_classes

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_cache_len(self) -> int:
        """Slots a full decode can write: cls, cond and all L tokens."""
        return self.image_seq_len + PREFIX

    def condition_ids(self, labels):
        """Class labels in [0, num_classes] (num_classes = null) -> embedding-table ids (official
        preprocess_condition / get_none_condition)."""
        return jnp.asarray(labels, jnp.int32) + (self.codebook_size + 1)

    # ---- modules ------------------------------------------------------------------------------------------------
    def setup(self):
        d = self.hidden_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        free = with_axes(_normal02, (None, None, "embed"))
        self.cls_token = self.param("cls_token", with_axes(nn.initializers.zeros, (None, None, "embed")),
                                    (1, 1, d), self.param_dtype)
        self.pos_embed = self.param("pos_embed", free, (1, self.image_seq_len + POS_EXTRA_ROWS, d), self.param_dtype)
        self.target_aware_pos_embed = self.param("target_aware_pos_embed", free,
                                                 (1, self.image_seq_len + POS_EXTRA_ROWS, d), self.param_dtype)
        self.timesteps_embeddings = self.param("timesteps_embeddings", free,
                                               (1, self.image_seq_len + TIMESTEP_EXTRA_ROWS, d), self.param_dtype)
        self.embeddings = Embed(self.num_embeddings, d, axes=("classes", "embed"), embedding_init=_normal02, **kw)
        # static_argnums counts self: (x, c, mask, deterministic) -> deterministic is 4
        block = nn.remat(AdaLNZeroBlock, static_argnums=(4,)) if self.remat else AdaLNZeroBlock
        self.blocks = [block(d, self.num_heads, self.mlp_dim, qkv_bias=True, qk_norm=True, norm_eps=self.norm_eps,
                             norm_affine=True, attn_drop=self.attn_dropout, proj_drop=self.dropout,
                             act="gelu_exact", attention_impl=self.attention_impl, **kw)
                       for _ in range(self.depth)]
        self.adaln_before_head = AdaLNFinalNorm(d, self.norm_eps, chunk_order="scale_shift", **kw)
        self.lm_head = Dense(self.codebook_size, axes=("embed", "vocab"), kernel_init=_normal02, **kw)

    def _tables(self):
        """(pos_embed, target_aware_pos_embed, timesteps_embeddings) as f32 (rows, D)."""
        return tuple(t[0].astype(jnp.float32) for t in (self.pos_embed, self.target_aware_pos_embed,
                                                        self.timesteps_embeddings))

    def _head(self, x, c):
        return self.lm_head(self.adaln_before_head(x, c)).astype(jnp.float32)

    def _drop_labels(self, labels, train: bool):
        if train and self.class_drop_prob > 0:
            return drop_labels(self.make_rng("dropout"), labels, self.class_drop_prob, self.null_label)
        return jnp.asarray(labels, jnp.int32)

    # ---- teacher forcing ----------------------------------------------------------------------------------------
    def forward_logits(self, tokens, labels, orders=None, train: bool = False):
        """The official forward_fn: tokens (B, T) int (raster order, T <= L; T = L when `orders` is given),
        labels (B,), orders (B, L) permutation or None (raster) -> logits (B, T + 1, V) float32.

        Position i of the output predicts the (permuted) token i; position T follows the last token (for T = L it
        predicts nothing and is what the official forward returns last). With `train` the class is dropped to the
        null class with probability class_drop_prob and dropout is on ('dropout' rng). Block outputs (B, T + 2, D)
        are sown as intermediates 'block{i}_out'.
        """
        b, t = tokens.shape
        seq = self.image_seq_len
        if t > seq:
            raise ValueError(f"RAR got {t} tokens but image_seq_len is {seq}")
        if orders is not None and t != seq:
            raise ValueError(f"a token order needs the full sequence ({seq} tokens), got {t}")
        cond = self.condition_ids(self._drop_labels(labels, train))
        tokens = jnp.asarray(tokens, jnp.int32)
        if orders is not None:
            tokens = shuffle_tokens(tokens, orders)
        emb = self.embeddings(jnp.concatenate([cond[:, None], tokens], axis=1)).astype(jnp.float32)  # (B, T+1, D)
        pos, tap, steps = self._tables()
        n = t + PREFIX
        d = self.hidden_size
        if orders is None:
            pos_all = pos[None, :n]  # raster: slot j gets row j
            tap_img = tap[None, PREFIX:PREFIX + seq]
        else:
            rows = orders.astype(jnp.int32) + PREFIX
            pos_all = jnp.concatenate([jnp.broadcast_to(pos[None, :PREFIX], (b, PREFIX, d)),
                                       jnp.take(pos, rows, axis=0)], axis=1)
            tap_img = jnp.take(tap, rows, axis=0)
        zero = jnp.zeros((tap_img.shape[0], 1, d), jnp.float32)
        tap_all = jnp.concatenate([zero, tap_img, zero], axis=1)[:, :n]  # shifted by one: slot j -> row of j+1's token
        cls = jnp.broadcast_to(self.cls_token.astype(jnp.float32), (b, 1, d))
        x = jnp.concatenate([cls, emb], axis=1) + pos_all + tap_all
        x = constrain(x, ("batch", "length", "embed"))
        c = emb[:, :1] + steps[None, :n]
        mask = jnp.tril(jnp.ones((n, n), bool))
        for i, blk in enumerate(self.blocks):
            x = blk(x, c, mask, not train)
            if not self.is_initializing():
                self.sow("intermediates", f"block{i}_out", x)
        return self._head(x[:, 1:], c[:, 1:])

    def __call__(self, tokens, labels, orders=None, train: bool = False):
        """Teacher forcing: tokens (B, T) (raster), labels (B,), orders (B, L) or None -> logits (B, T, V); logits[:, i]
        predicts `shuffle_tokens(tokens, orders)[:, i]` (the raster token i when orders is None)."""
        return self.forward_logits(tokens, labels, orders, train)[:, :-1]

    # ---- KV-cached raster decoding ------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: Optional[int] = None, dtype: Optional[Dtype] = None) -> Caches:
        """One zero `KVCache` per block, (batch, heads, max_len, head_dim); max_len defaults to L + 2 (every slot)."""
        n = self.max_cache_len if max_len is None else int(max_len)
        return tuple(KVCache.zeros(batch, self.num_heads, n, self.head_dim, dtype or self.dtype)
                     for _ in range(self.depth))

    def _blocks_cached(self, x, c, caches: Caches, index, modulations=None) -> Tuple[jax.Array, Caches]:
        new = []
        for i, (blk, cache) in enumerate(zip(self.blocks, caches)):
            x, cache = blk(x, c, None, True, cache, index, None if modulations is None else modulations[i])
            new.append(cache)
        return x, tuple(new)

    def _slot_condition(self, labels, slots):
        """adaLN condition of cache slots `slots` (int (K,), traced ok): emb(cond) + timesteps_embeddings[slot]
        -> (B, K, D) f32."""
        e = self.embeddings(self.condition_ids(labels)).astype(jnp.float32)
        steps = jnp.take(self.timesteps_embeddings[0], slots, axis=0).astype(jnp.float32)
        return e[:, None] + steps[None]

    def block_modulations(self, labels, slots):
        """Every block's six adaLN chunks for cache slots `slots` (K,), packed: a tuple (depth) of (B, K, 6D) f32,
        computed in one matmul per block. `decode_step(..., modulations=row k of them)` then skips the D x 6D
        modulation weights, a third of the weights each decoded token would otherwise read."""
        c = self._slot_condition(labels, slots)
        return tuple(blk.modulation(c, packed=True) for blk in self.blocks)

    def prefill(self, labels, caches: Caches) -> Tuple[jax.Array, Caches]:
        """Run [cls, cond] (cache slots 0, 1) -> (logits (B, V) of the first token, caches)."""
        e = self.embeddings(self.condition_ids(labels)).astype(jnp.float32)  # (B, D)
        pos, tap, steps = self._tables()
        cls = jnp.broadcast_to(self.cls_token[0].astype(jnp.float32) + pos[0], e.shape)
        x = jnp.stack([cls, e + pos[1] + tap[PREFIX]], axis=1)  # cond carries the position of raster token 0
        c = e[:, None] + steps[None, :PREFIX]
        x, caches = self._blocks_cached(x, c, caches, 0)
        return self._head(x[:, 1:], c[:, 1:])[:, 0], caches

    def decode_step(self, token, position, labels, caches: Caches, modulations=None) -> Tuple[jax.Array, Caches]:
        """Feed raster token `position` (traced int scalar, 0 <= position < L; token (B,) int) into cache slot
        position + 2 -> (logits (B, V) of token position + 1, caches). labels (B,) as for `prefill`;
        `modulations`: this slot's `block_modulations` (each (B, 1, 6D)), or None to compute them here."""
        position = jnp.asarray(position, jnp.int32)
        slot = position + PREFIX
        seq = self.image_seq_len

        def row(table, i):  # one row, cast after slicing (the tables are param_dtype)
            return jax.lax.dynamic_index_in_dim(table[0], i, axis=0, keepdims=False).astype(jnp.float32)

        pos, tap, steps = self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings
        nxt = position + 1  # the position this slot predicts; none after the last token
        tap_row = jnp.where(nxt < seq, row(tap, jnp.minimum(nxt, seq - 1) + PREFIX), 0.0)
        tok = self.embeddings(jnp.asarray(token, jnp.int32)).astype(jnp.float32)  # (B, D)
        x = (tok + row(pos, slot) + tap_row)[:, None]
        e = self.embeddings(self.condition_ids(labels)).astype(jnp.float32)
        c = (e + row(steps, slot))[:, None]
        x, caches = self._blocks_cached(x, c, caches, slot, modulations)
        return self._head(x, c)[:, 0], caches


# ----------------------------------------------------------------------------- construction helpers
def rar_fields() -> Tuple[str, ...]:
    """The RAR dataclass fields a config may set."""
    return strict.field_names(RAR)


def rar_from_fields(fields: Mapping[str, Any]) -> RAR:
    """Build RAR from a plain mapping of its fields (dtype / param_dtype may be strings), strictly (`jaxgen.strict`)."""
    fields = dict(fields)
    for name in ("dtype", "param_dtype"):
        if name in fields:
            fields[name] = jnp.dtype(fields[name])
    return strict.build(RAR, fields, "RAR fields")


def init_params(model: RAR, rng: jax.Array):
    """Boxed params (logical-axis metadata kept)."""
    tokens = jnp.zeros((1, model.image_seq_len), jnp.int32)
    return model.init({"params": rng}, tokens, jnp.zeros((1,), jnp.int32))["params"]


def abstract_params(model: RAR):
    """Unboxed ShapeDtypeStructs of the params, no allocation (for converters and manifests)."""
    from jaxgen.train.restore import abstract_of

    return abstract_of(lambda: init_params(model, jax.random.PRNGKey(0)))
