"""BERT-style pieces of the masked-token models (MaskGIT, AutoNAT): token embeddings and the tied MLM head.

`BertEmbeddings`: word + learned position embedding -> LayerNorm -> dropout (HuggingFace / MaskGIT `Embed`).
`MlmHead`: Dense -> GELU -> LayerNorm -> hidden @ word_table^T + bias: the output projection IS the input embedding
table (tied), optionally with the gradient stopped (AutoNAT detaches the table; MaskGIT does not).

Param names: word_embeddings/embedding, position_embeddings/embedding, LayerNorm/{scale,bias} (BERT's own spelling,
kept so converters stay one-to-one); fc/{kernel,bias}, ln/{scale,bias}, bias (1, 1, vocab).
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.nn.dropout import Dropout
from jaxgen.nn.layers import Dense, Dtype, Embed, LayerNorm, with_axes, zeros
from jaxgen.nn.transformer import ACTIVATIONS

_normal02 = nn.initializers.normal(0.02)


class BertEmbeddings(nn.Module):
    """ids (B, T) int -> (B, T, D): word[ids] + position[0..T-1], LayerNorm, dropout. T <= max_positions."""

    vocab_size: int
    features: int
    max_positions: int
    norm_eps: float = 1e-6
    dropout: float = 0.0
    embedding_init: Callable = _normal02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=jnp.float32, param_dtype=self.param_dtype, embedding_init=self.embedding_init)
        self.word_embeddings = Embed(self.vocab_size, self.features, axes=("vocab", "embed"), **kw)
        self.position_embeddings = Embed(self.max_positions, self.features, axes=(None, "embed"), **kw)
        self.LayerNorm = LayerNorm(self.norm_eps, dtype=jnp.float32, param_dtype=self.param_dtype)
        self.drop = Dropout(self.dropout)

    def __call__(self, ids, deterministic: bool = True):
        t = ids.shape[-1]
        if t > self.max_positions:
            raise ValueError(f"{t} tokens but only {self.max_positions} position embeddings")
        x = self.word_embeddings(jnp.asarray(ids, jnp.int32)) + self.position_embeddings(jnp.arange(t))[None]
        x = self.drop(self.LayerNorm(x), deterministic=deterministic)
        return x.astype(self.dtype)

    def table(self) -> jax.Array:
        """The word-embedding table (vocab, D) (for a tied output head)."""
        return nn.meta.unbox(self.word_embeddings.variables["params"]["embedding"])


class MlmHead(nn.Module):
    """hidden (B, T, D) and the word table (V, D) -> logits (B, T, V) float32."""

    features: int
    vocab_size: int
    act: str = "gelu_exact"
    norm_eps: float = 1e-5
    detach_table: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, table):
        h = Dense(self.features, axes=("embed", "mlp"), kernel_init=_normal02, dtype=self.dtype,
                  param_dtype=self.param_dtype, name="fc")(x)
        h = LayerNorm(self.norm_eps, dtype=jnp.float32, param_dtype=self.param_dtype, name="ln")(
            ACTIVATIONS[self.act](h))
        table = jax.lax.stop_gradient(table) if self.detach_table else table
        logits = jnp.dot(h.astype(self.dtype), table.astype(self.dtype).T, preferred_element_type=jnp.float32)
        bias = self.param("bias", with_axes(zeros, (None, None, "vocab")), (1, 1, self.vocab_size),
                          self.param_dtype)
        return logits + bias.astype(jnp.float32)
