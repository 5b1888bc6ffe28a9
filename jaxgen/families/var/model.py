"""The VAR next-scale transformer (FoundationVision/VAR models/var.py + basic_var.py) in linen.

Sequence = all token maps of the scale pyramid, coarse to fine (L = sum pn^2). The first "scale" is the class embedding
(+ pos_start); the others are the word-embedded teacher-forcing inputs. Attention is block-causal: a token sees every
token of its own and coarser scales. Every block is AdaLN-modulated by the class embedding.

Param tree (torch name in brackets):
  word_embed [word_embed], class_emb/embedding [class_emb], pos_start (1, first_l, C), pos_1LC (1, L, C),
  lvl_embed/embedding [lvl_embed], shared_ada_lin [shared_ada_lin.1] (shared_aln only),
  blocks_{i}/{attn/{qkv [mat_qkv], q_bias, v_bias, scale_mul (H,) [scale_mul_1H11], proj}, ffn/{fc1, fc2},
              ada_lin [ada_lin.1] | ada_gss (1, 1, 6, C)},
  head_nm/ada_lin [head_nm.ada_lin.1], head [head].
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import strict
from jaxgen.nn.attention import clip_query_chunks, dot_product_attention
from jaxgen.nn.dropout import drop_labels
from jaxgen.nn.fence import gradient_fence
from jaxgen.nn.layers import Dense, DropPath, Embed, LayerNorm, constrain, gelu_tanh, silu, with_axes

Dtype = Any
KV = Tuple[jax.Array, jax.Array]


# ----------------------------------------------------------------------------- static structure
def level_ids(patch_nums: Sequence[int]) -> np.ndarray:
    """Scale index of every position (L,) (the official `lvl_1L` buffer)."""
    return np.concatenate([np.full(pn * pn, i, np.int32) for i, pn in enumerate(patch_nums)])


def block_causal_mask(patch_nums: Sequence[int]) -> np.ndarray:
    """(L, L) bool, True where query q may attend key k: level(k) <= level(q)."""
    lvl = level_ids(patch_nums)
    return lvl[None, :] <= lvl[:, None]


def block_causal_bias(patch_nums: Sequence[int]) -> np.ndarray:
    """The official additive `attn_bias_for_masking` (1, 1, L, L): 0 / -inf."""
    return np.where(block_causal_mask(patch_nums), 0.0, -np.inf).astype(np.float32)[None, None]


def attention_chunks(patch_nums: Sequence[int], min_tokens: int = 64) -> Tuple[Tuple[int, int, bool], ...]:
    """Query chunks for the block-causal attention (`dot_product_attention(query_chunks=...)`): every scale of at
    least `min_tokens` tokens alone (it sees keys up to its own end, unmasked), the smaller scales before them
    together. VAR-d16 (680 tokens): (0, 91), (91, 155), (155, 255), (255, 424), (424, 680), 63 % of the 680 x 680
    pairs; the third entry says whether the chunk is one scale (True: no mask within it)."""
    scales = set(map(tuple, begin_ends(patch_nums)))
    bounds = {sum(pn * pn for pn in patch_nums)}
    for begin, end in scales:
        if end - begin >= min_tokens:
            bounds |= {begin, end}
    bounds = sorted(bounds - {0})
    return tuple((a, b, (a, b) in scales) for a, b in zip([0] + bounds[:-1], bounds))


def begin_ends(patch_nums: Sequence[int]) -> List[Tuple[int, int]]:
    out, cur = [], 0
    for pn in patch_nums:
        out.append((cur, cur + pn * pn))
        cur += pn * pn
    return out


def trunc_normal(std: float, scale: float = 1.0):
    """torch.nn.init.trunc_normal_(std=std) (truncated at ABSOLUTE +-2, not +-2 std), optionally rescaled."""
    def init(key, shape, dtype=jnp.float32):
        lim = 2.0 / std
        return (jax.random.truncated_normal(key, -lim, lim, shape, jnp.float32) * (std * scale)).astype(dtype)
    return init


def _scaled_columns(std: float, split: int, first: float, rest: float):
    """trunc_normal(std) kernel (in, out) with output features [:split] scaled by `first` and [split:] by `rest`
    (the official ada_lin init: gammas x init_adaln_gamma, scales / shifts x init_adaln)."""
    base = trunc_normal(std)

    def init(key, shape, dtype=jnp.float32):
        w = base(key, shape, jnp.float32)
        col = jnp.where(jnp.arange(shape[-1]) < split, first, rest)
        return (w * col).astype(dtype)
    return init


def _ada_gss_init(c: int, first: float, rest: float):
    def init(key, shape, dtype=jnp.float32):
        w = jax.random.normal(key, shape, jnp.float32) / math.sqrt(c)
        row = jnp.where(jnp.arange(6) < 2, first, rest)[None, None, :, None]
        return (w * row).astype(dtype)
    return init


# ----------------------------------------------------------------------------- modules
class VARSelfAttention(nn.Module):
    """qkv = x W + [q_bias | 0 | v_bias]; l2-normalised q, k with a learned per-head temperature exp(min(s, ln 100))
    and softmax scale 1 (attn_l2_norm) or the plain scale 0.25/sqrt(head_dim). Returns (out, (k, v)) where k, v include
    `past` (the KV cache of coarser scales) when given."""
    embed_dim: int
    num_heads: int
    attn_l2_norm: bool = True
    init_std: float = 0.02
    proj_scale: float = 1.0
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    query_chunks: Tuple[Tuple[int, int], ...] = ()  # `attention_chunks`: teacher forcing's block-causal structure

    @nn.compact
    def __call__(self, x, mask=None, past: Optional[KV] = None) -> Tuple[jax.Array, KV]:
        b, l, c = x.shape
        h = self.num_heads
        hd = c // h
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q_bias = self.param("q_bias", with_axes(nn.initializers.zeros, ("heads",)), (c,), self.param_dtype)
        v_bias = self.param("v_bias", with_axes(nn.initializers.zeros, ("heads",)), (c,), self.param_dtype)
        qkv = Dense(3 * c, axes=("embed", "heads"), use_bias=False, kernel_init=trunc_normal(self.init_std),
                    name="qkv", **kw)(x).astype(jnp.float32)
        bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(jnp.float32)
        qkv = (qkv + bias).reshape(b, l, 3, h, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, L, H, hd)
        if self.attn_l2_norm:
            scale_mul = self.param("scale_mul", with_axes(nn.initializers.constant(math.log(4.0)), (None,)),
                                   (h,), self.param_dtype)
            temp = jnp.exp(jnp.minimum(scale_mul.astype(jnp.float32), math.log(100.0)))
            q = _l2_normalize(q) * temp[None, None, :, None]
            k = _l2_normalize(k)
            scale = 1.0
        else:
            scale = 0.25 / math.sqrt(hd)
        q, k, v = (t.astype(self.dtype) for t in (q, k, v))
        if past is not None:
            k = jnp.concatenate([past[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([past[1].astype(v.dtype), v], axis=1)
        # teacher forcing (block-causal mask over the sequence or a prefix of it): per chunk of scales
        chunks = clip_query_chunks(self.query_chunks, l) if (past is None and mask is not None) else None
        out = dot_product_attention(q, k, v, mask=mask, impl=self.attn_impl, scale=scale, query_chunks=chunks)
        out = constrain(out.reshape(b, l, c), ("batch", "length", "heads"))
        out = Dense(c, axes=("heads", "embed"), kernel_init=trunc_normal(self.init_std, self.proj_scale),
                    name="proj", **kw)(out)
        return out, (k, v)


_L2_EPS = 1e-12


def _l2_norm(x):
    return jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)), _L2_EPS)


@jax.custom_vjp
def _l2_normalize(x):
    """torch's F.normalize: x / max(||x||, eps). Its gradient is written in terms of the output (and the norm), so
    that training keeps the normalised q and k, which attention keeps anyway, and not also the raw ones and the fused
    qkv they were sliced from (VAR-d16's train step: -80 MB of its peak)."""
    x = x.astype(jnp.float32)
    return x / _l2_norm(x)


def _l2_normalize_fwd(x):
    norm = _l2_norm(x.astype(jnp.float32))
    y = x.astype(jnp.float32) / norm
    return y, (y, norm)


def _l2_normalize_bwd(saved, g):
    y, norm = saved
    projected = g - y * jnp.sum(g * y, axis=-1, keepdims=True)  # d(x / ||x||) = (g - y <g, y>) / ||x||
    return (jnp.where(norm > _L2_EPS, projected, g) / norm,)  # where the eps clamps, x / eps: linear


_l2_normalize.defvjp(_l2_normalize_fwd, _l2_normalize_bwd)


class FFN(nn.Module):
    embed_dim: int
    hidden: int
    init_std: float = 0.02
    fc2_scale: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.hidden, axes=("embed", "mlp"), kernel_init=trunc_normal(self.init_std), name="fc1", **kw)(x)
        x = gelu_tanh(x)
        return Dense(self.embed_dim, axes=("mlp", "embed"), kernel_init=trunc_normal(self.init_std, self.fc2_scale),
                     name="fc2", **kw)(x)


class AdaLNSelfAttn(nn.Module):
    """x += drop_path(attn(LN(x)(1+scale1)+shift1) * gamma1); x += drop_path(ffn(LN(x)(1+scale2)+shift2) * gamma2).

    The modulation (B, 1, 6, C) is chunked [gamma1, gamma2, scale1, scale2, shift1, shift2]: from this block's ada_lin
    on SiLU(cond), or (shared_aln) the model-level shared projection `cond` plus this block's learned ada_gss."""
    embed_dim: int
    num_heads: int
    depth: int
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    drop_path: float = 0.0
    shared_aln: bool = False
    attn_l2_norm: bool = True
    init_std: float = 0.02
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    attn_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    query_chunks: Tuple[Tuple[int, int], ...] = ()

    @nn.compact
    def __call__(self, x, cond, mask=None, past: Optional[KV] = None, deterministic: bool = True):
        c = self.embed_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.shared_aln:
            gss = self.param("ada_gss", with_axes(_ada_gss_init(c, self.init_adaln_gamma, self.init_adaln),
                                                  (None, None, None, "embed")), (1, 1, 6, c), self.param_dtype)
            ada = gss.astype(jnp.float32) + cond.astype(jnp.float32)
        else:
            ada = Dense(6 * c, axes=("embed", "mlp"),
                        kernel_init=_scaled_columns(self.init_std, 2 * c, self.init_adaln_gamma, self.init_adaln),
                        name="ada_lin", **kw)(silu(cond)).astype(jnp.float32).reshape(-1, 1, 6, c)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (ada[:, :, i] for i in range(6))
        ln = LayerNorm(self.norm_eps, use_scale=False, use_bias=False, dtype=jnp.float32)
        depth_scale = 1.0 / math.sqrt(2 * self.depth)
        drop = DropPath(self.drop_path)

        h = (ln(x) * (1.0 + scale1) + shift1).astype(self.dtype)
        h, kv = VARSelfAttention(c, self.num_heads, self.attn_l2_norm, self.init_std, depth_scale, self.attn_impl,
                                 query_chunks=self.query_chunks, name="attn", **kw)(h, mask, past)
        x = x + drop(h.astype(jnp.float32) * gamma1, deterministic)
        h = (ln(x) * (1.0 + scale2) + shift2).astype(self.dtype)
        h = FFN(c, int(round(c * self.mlp_ratio)), self.init_std, depth_scale, name="ffn", **kw)(h)
        x = x + drop(h.astype(jnp.float32) * gamma2, deterministic)
        # the backward stays linear in depth on XLA:CPU (jaxgen.nn.fence); an identity otherwise
        return gradient_fence(constrain(x, ("batch", "length", "embed"))), kv


class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer.

    __call__(labels, x_wo_first, train) -> logits (B, L, V) float32 (teacher forcing, block-causal mask); x_wo_first
    may cover only the first scales (then L is that prefix's length).
    For KV-cached inference: `first_tokens`, `scale_tokens`, `cond_features`, `blocks_step`, `logits_from` (see sampler).
    """
    vocab_size: int = 4096
    cvae: int = 32
    num_classes: int = 1000
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    cond_drop_rate: float = 0.1
    attn_l2_norm: bool = True
    patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0  # < 0: sqrt(1 / (3 C)) as the official build
    # speed only: teacher forcing attends per chunk of scales (`attention_chunks`), every scale of at least this many
    # tokens its own chunk; 0: one dense masked attention over the whole sequence
    attn_chunk_tokens: int = 64
    attn_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    def _std(self) -> float:
        return self.init_std if self.init_std >= 0 else math.sqrt(1.0 / self.embed_dim / 3.0)

    def setup(self):
        c, std = self.embed_dim, self._std()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c % self.num_heads:
            raise ValueError(f"embed_dim {c} is not divisible by num_heads {self.num_heads}")
        self.word_embed = Dense(c, axes=("latent", "embed"), kernel_init=trunc_normal(std), **kw)
        self.class_emb = Embed(self.num_classes + 1, c, axes=("classes", "embed"), embedding_init=trunc_normal(std),
                               **kw)
        self.pos_start = self.param("pos_start", with_axes(trunc_normal(std), (None, None, "embed")),
                                    (1, self.first_l, c), self.param_dtype)
        self.pos_1LC = self.param("pos_1LC", with_axes(trunc_normal(std), (None, None, "embed")),
                                  (1, self.seq_len, c), self.param_dtype)
        self.lvl_embed = Embed(len(self.patch_nums), c, axes=(None, "embed"), embedding_init=trunc_normal(std), **kw)
        if self.shared_aln:
            self.shared_ada_lin = Dense(6 * c, axes=("embed", "mlp"), kernel_init=trunc_normal(std), **kw)
        dpr = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth > 1 else np.zeros(1)
        block = nn.remat(AdaLNSelfAttn, static_argnums=(5,)) if self.remat else AdaLNSelfAttn
        chunks = attention_chunks(self.patch_nums, self.attn_chunk_tokens) if self.attn_chunk_tokens > 0 else ()
        self.blocks = [block(c, self.num_heads, self.depth, self.mlp_ratio, self.norm_eps, float(dpr[i]),
                             self.shared_aln, self.attn_l2_norm, std, self.init_adaln, self.init_adaln_gamma,
                             self.attn_impl, query_chunks=chunks, **kw)
                       for i in range(self.depth)]
        self.head_nm = AdaLNBeforeHead(c, self.norm_eps, std, self.init_adaln, **kw)
        self.head = Dense(self.vocab_size, axes=("embed", "vocab"), kernel_init=trunc_normal(std, self.init_head),
                          **kw)

    # ------------------------------------------------------------------ pieces used by both paths
    def lvl_pos(self):
        """(1, L, C) level embedding + absolute position embedding."""
        return self.lvl_embed(jnp.asarray(level_ids(self.patch_nums)))[None].astype(jnp.float32) \
            + self.pos_1LC.astype(jnp.float32)

    def cond_features(self, labels):
        """(class embedding (B, C) = the AdaLN condition, what blocks take: shared projection or the embedding)."""
        cond = self.class_emb(labels).astype(jnp.float32)
        if self.shared_aln:
            return cond, self.shared_ada_lin(silu(cond)).astype(jnp.float32).reshape(-1, 1, 6, self.embed_dim)
        return cond, cond

    def first_tokens(self, cond):
        """Scale-0 tokens: class embedding + pos_start + level/pos embedding of the first positions."""
        b = cond.shape[0]
        sos = jnp.broadcast_to(cond[:, None], (b, self.first_l, self.embed_dim)) + self.pos_start.astype(jnp.float32)
        return sos + self.lvl_pos()[:, :self.first_l]

    def scale_tokens(self, si: int, x_flat):
        """Tokens of scale si >= 1 from its (B, pn^2, Cvae) input map: word_embed + level/pos embedding slice."""
        bg, ed = begin_ends(self.patch_nums)[si]
        return self.word_embed(x_flat.astype(jnp.float32)).astype(jnp.float32) + self.lvl_pos()[:, bg:ed]

    def logits_from(self, x, cond):
        return self.head(self.head_nm(x.astype(jnp.float32), cond)).astype(jnp.float32)

    def blocks_step(self, x, cond_blocks, past: Optional[List[KV]] = None, mask=None, deterministic: bool = True):
        """Run every block; `past` is the per-block KV cache (None for the first scale / teacher forcing).
        Returns (x, new per-block caches)."""
        new = []
        x = x.astype(jnp.float32)
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, cond_blocks, mask, None if past is None else past[i], deterministic)
            if not self.is_initializing():
                self.sow("intermediates", f"block{i}_out", x)
            new.append(kv)
        return x, new

    # ------------------------------------------------------------------ teacher forcing
    def __call__(self, labels, x_wo_first, train: bool = False):
        b = labels.shape[0]
        if train and self.cond_drop_rate > 0:
            labels = drop_labels(self.make_rng("dropout"), labels, self.cond_drop_rate, self.num_classes)
        cond, cond_blocks = self.cond_features(labels)
        sos = jnp.broadcast_to(cond[:, None], (b, self.first_l, self.embed_dim)) + self.pos_start.astype(jnp.float32)
        x = jnp.concatenate([sos, self.word_embed(x_wo_first.astype(jnp.float32)).astype(jnp.float32)], axis=1)
        # x_wo_first may hold only the first scales (progressive training): every table is sliced to that prefix
        length = x.shape[1]
        x = x + self.lvl_pos()[:, :length]
        x = constrain(x, ("batch", "length", "embed"))
        mask = jnp.asarray(block_causal_mask(self.patch_nums)[:length, :length])[None, None]
        x, _ = self.blocks_step(x, cond_blocks, None, mask, deterministic=not train)
        return self.logits_from(x, cond)


class AdaLNBeforeHead(nn.Module):
    """LN(x) * (1 + scale) + shift with [scale, shift] = ada_lin(SiLU(cond)) (C -> 2C)."""
    embed_dim: int
    norm_eps: float = 1e-6
    init_std: float = 0.02
    init_adaln: float = 0.5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond):
        c = self.embed_dim
        ada = Dense(2 * c, axes=("embed", "mlp"), kernel_init=trunc_normal(self.init_std, self.init_adaln),
                    name="ada_lin", dtype=self.dtype, param_dtype=self.param_dtype)(silu(cond))
        ada = ada.astype(jnp.float32).reshape(-1, 1, 2, c)
        y = LayerNorm(self.norm_eps, use_scale=False, use_bias=False, dtype=jnp.float32)(x)
        return (y * (1.0 + ada[:, :, 0]) + ada[:, :, 1]).astype(self.dtype)


def var_from_config(m, vocab_size: int, cvae: int, attn_impl: str = "xla", remat: bool = False,
                    dtype=jnp.float32, param_dtype=jnp.float32, where: str = "config.model") -> VAR:
    """Build from config.model (strict: every key must be a VAR field). The official size rule fills what is not
    given: width 64 * depth, depth heads, drop path 0.1 * depth / 24."""
    fields = strict.check_keys(VAR, m, where, exclude=("vocab_size", "cvae", "attn_impl", "remat", "dtype",
                                                       "param_dtype"))
    depth = int(fields.get("depth", VAR.depth))
    fields.setdefault("embed_dim", 64 * depth)
    fields.setdefault("num_heads", depth)
    fields.setdefault("drop_path_rate", 0.1 * depth / 24)
    return VAR(vocab_size=vocab_size, cvae=cvae, attn_impl=attn_impl, remat=remat, dtype=dtype,
               param_dtype=param_dtype, **fields)
