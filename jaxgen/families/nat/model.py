"""The two NAT backbones, from the shared blocks. Both map (ids (B, L) with mask_id at masked positions, labels (B,))
to logits (B, L, codebook_size) float32; a label is a class id in [0, num_classes], num_classes = the null class
(U-ViT only: MaskGIT has none, so no classifier-free guidance).

`UViT` (AutoNAT, LeapLabTHU/ImprovedNAT libs/nat_model.py): token_emb = BertEmbeddings(codebook + 1 rows, mask id =
codebook_size; LN eps 1e-6; dropout 0.1), the class token context_embed = BertEmbeddings(num_classes + 1 rows, one
position, LN eps 1e-6, no dropout) prepended at position 0; depth // 2 in_blocks, a mid_block and depth // 2
out_blocks, each out block first mixing `skip_linear(concat[x, skip])` (Linear 2D -> D; skips popped last-in
first-out, so out_blocks_0 pairs with the last in block); pre-LN `Block`s with eps 1e-5, no qkv bias, exact GELU,
attention scale head_dim^-0.5; final norm eps 1e-5; `MlmHead` tied to the DETACHED word table; outputs after the
class token, first codebook_size columns.

`MaskGITTransformer` (google-research/maskgit nets/maskgit_transformer.py): one vocabulary of codebook_size codes,
num_classes class tokens (label + codebook_size) and the mask token last; sequence [class token, L tokens];
BertEmbeddings with LN eps 1e-12; post-LN `PostLNBlock`s (eps 1e-12, tanh GELU, qkv bias, dropout 0.1 after attention
and MLP and on the attention probabilities); `MlmHead` (tanh GELU, eps 1e-12) tied to the word table WITH gradient;
outputs after the class token, first codebook_size columns.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen import strict
from jaxgen.nn.bert import BertEmbeddings, MlmHead
from jaxgen.nn.dropout import drop_labels
from jaxgen.nn.layers import Dense, Dtype, LayerNorm, constrain
from jaxgen.nn.transformer import Block, PostLNBlock

# torch trunc_normal_(std=0.02) truncates at +-2 ABSOLUTE: a plain normal for all purposes; flax's MaskGIT truncates
# at 2 std (`truncated_normal`), which matters only for from-scratch statistics.
_normal02 = nn.initializers.normal(0.02)
_trunc02 = nn.initializers.truncated_normal(0.02)

# Official geometries.
UVIT_SIZES = {"l": dict(embed_dim=768, depth=24, num_heads=8, mlp_ratio=4.0)}  # AutoNAT-L (25 blocks)
MASKGIT_SIZES = {"base": dict(hidden_size=768, depth=24, num_heads=16, mlp_dim=3072)}


class UViT(nn.Module):
    embed_dim: int = 768
    depth: int = 24  # in + out blocks; one mid block more
    num_heads: int = 8
    mlp_ratio: float = 4.0
    codebook_size: int = 1024
    num_classes: int = 1000
    image_seq_len: int = 256
    emb_dropout: float = 0.1  # official BertEmbeddings dropout on the token embeddings
    class_drop_prob: float = 0.15  # official p_uncond: a training label becomes the null class
    norm_eps: float = 1e-5
    emb_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def null_label(self) -> Optional[int]:
        return self.num_classes

    def setup(self):
        if self.depth % 2:
            raise ValueError(f"UViT depth must be even (depth // 2 in and out blocks + 1 mid), got {self.depth}")
        d = self.embed_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.token_emb = BertEmbeddings(self.codebook_size + 1, d, self.image_seq_len, self.emb_norm_eps,
                                        self.emb_dropout, **kw)
        self.context_embed = BertEmbeddings(self.num_classes + 1, d, 1, self.emb_norm_eps, 0.0, **kw)
        block = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
        make = lambda: block(d, self.num_heads, self.mlp_ratio, qkv_bias=False, norm_eps=self.norm_eps,  # noqa: E731
                             act="gelu_exact", attention_impl=self.attention_impl, **kw)
        half = self.depth // 2
        self.in_blocks = [make() for _ in range(half)]
        self.mid_block = make()
        self.out_blocks = [make() for _ in range(half)]
        self.skip_linears = [Dense(d, axes=("mlp", "embed"), kernel_init=_normal02, **kw) for _ in range(half)]
        self.norm = LayerNorm(self.norm_eps, **kw)
        self.mlm_layer = MlmHead(d, self.codebook_size + 1, act="gelu_exact", norm_eps=self.norm_eps,
                                 detach_table=True, **kw)

    def __call__(self, ids, labels, train: bool = False):
        det = not train
        x = self.token_emb(ids, deterministic=det)
        if train and self.class_drop_prob > 0:
            labels = drop_labels(self.make_rng("dropout"), labels, self.class_drop_prob, self.null_label)
        ctx = self.context_embed(jnp.asarray(labels, jnp.int32)[:, None], deterministic=True)
        self.sow("intermediates", "token_emb_out", x)
        self.sow("intermediates", "context_embed_out", ctx)
        x = constrain(jnp.concatenate([ctx, x], axis=1), ("batch", "length", "embed"))
        skips = []
        for i, blk in enumerate(self.in_blocks):
            x = blk(x, None, det)
            skips.append(x)
            self.sow("intermediates", f"in_block{i}_out", x)
        x = self.mid_block(x, None, det)
        self.sow("intermediates", "mid_block_out", x)
        for i, (blk, skip_linear) in enumerate(zip(self.out_blocks, self.skip_linears)):
            x = blk(skip_linear(jnp.concatenate([x, skips.pop()], axis=-1)), None, det)
            self.sow("intermediates", f"out_block{i}_out", x)
        x = self.norm(x)
        self.sow("intermediates", "norm_out", x)
        logits = self.mlm_layer(x, self.token_emb.table())
        return logits[:, 1:, :self.codebook_size]


class MaskGITTransformer(nn.Module):
    hidden_size: int = 768
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 3072
    codebook_size: int = 1024
    num_classes: int = 1000
    image_seq_len: int = 256
    dropout: float = 0.1  # hidden_dropout_prob: embeddings, after attention, after the MLP
    attn_dropout: float = 0.1  # attention_probs_dropout_prob
    norm_eps: float = 1e-12
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_classes + 1

    @property
    def mask_id(self) -> int:
        """MaskGIT's mask_token_id -1, i.e. the last vocabulary row."""
        return self.vocab_size - 1

    @property
    def null_label(self) -> Optional[int]:
        return None

    def setup(self):
        d = self.hidden_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = BertEmbeddings(self.vocab_size, d, self.image_seq_len + 1, self.norm_eps, self.dropout,
                                         embedding_init=_trunc02, **kw)
        block = nn.remat(PostLNBlock, static_argnums=(3,)) if self.remat else PostLNBlock
        self.blocks = [block(d, self.num_heads, self.mlp_dim, qkv_bias=True, norm_eps=self.norm_eps,
                             attn_drop=self.attn_dropout, proj_drop=self.dropout, act="gelu_tanh",
                             attention_impl=self.attention_impl, **kw) for _ in range(self.depth)]
        self.mlm_layer = MlmHead(d, self.vocab_size, act="gelu_tanh", norm_eps=self.norm_eps, detach_table=False,
                                 **kw)

    def __call__(self, ids, labels, train: bool = False):
        det = not train
        class_ids = jnp.asarray(labels, jnp.int32)[:, None] + self.codebook_size
        x = self.embeddings(jnp.concatenate([class_ids, jnp.asarray(ids, jnp.int32)], axis=1), deterministic=det)
        x = constrain(x, ("batch", "length", "embed"))
        for blk in self.blocks:
            x = blk(x, None, det)
        logits = self.mlm_layer(x, self.embeddings.table())
        return logits[:, 1:, :self.codebook_size]


BACKBONES = {"uvit": UViT, "maskgit": MaskGITTransformer}
Backbone = Any  # UViT | MaskGITTransformer


def backbone_class(name: str):
    if name not in BACKBONES:
        raise ValueError(f"unknown NAT backbone {name!r}; use one of {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def backbone_from_fields(name: str, fields: Mapping[str, Any]) -> Backbone:
    """Build a backbone from a plain mapping of its fields (dtype / param_dtype may be strings), strictly."""
    fields = dict(fields)
    for key in ("dtype", "param_dtype"):
        if key in fields:
            fields[key] = jnp.dtype(fields[key])
    return strict.build(backbone_class(name), fields, f"{name} fields")


def init_params(model: Backbone, rng: jax.Array):
    """Boxed params (logical-axis metadata kept)."""
    ids = jnp.zeros((1, model.image_seq_len), jnp.int32)
    return model.init({"params": rng}, ids, jnp.zeros((1,), jnp.int32))["params"]


def abstract_params(model: Backbone):
    from jaxgen.train.restore import abstract_of

    return abstract_of(lambda: init_params(model, jax.random.PRNGKey(0)))


def intermediates(model: Backbone, params, ids, labels) -> Tuple[jax.Array, dict]:
    """(logits, {name: sown value}) in eval mode (parity hooks)."""
    logits, state = model.apply({"params": params}, ids, labels, mutable=["intermediates"])
    return logits, {k: v[0] for k, v in state["intermediates"].items()}
