"""MAR (Li et al. 2024): MAE-style bidirectional encoder/decoder over continuous tokens + a per-token diffusion head.

Static shapes. The official encoder DROPS masked tokens (ragged across calls, same count per row). Here:
- default: the encoder keeps the full length (buffer + seq_len) and masked tokens are excluded as attention keys.
  Visible rows then equal the official outputs (attention is permutation-equivariant; only float rounding differs).
  Masked rows of the encoder output hold arbitrary values: they attend to the visible tokens but are never attended
  to, and the decoder overwrites them with `mask_token`.
- `num_keep=K` (static int): the encoder gathers the buffer + the first K visible tokens of each row (in position
  order), runs on that shorter sequence and scatters back (masked rows = 0). Exact as long as every row has
  <= K visible tokens; training with mask ratio >= 0.7 can use `max_visible(seq_len, 0.7)` and run ~3x cheaper.
- `keep_index` ((B, S) static S): the encoder runs on exactly those rows of buffer + L (the sampler passes the
  buffer + the tokens of its size bucket; masked ones among them are no keys), as the official runs on the visible.
The decoder always runs on the full length, as the official one does.

Token layout: jaxgen latents are NHWC (B, h, w, C); `patchify` orders token channels (c, p, q) like the official
NCHW patchify, so converted weights (z_proj, diffusion head) apply unchanged.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.nn import kernel_layout
from jaxgen.nn.diffusion_head import SimpleMLPAdaLN
from jaxgen.nn.layers import Dense, Dtype, Embed, LayerNorm, constrain, with_axes
from jaxgen.nn.transformer import BlockStack

_normal02 = nn.initializers.normal(0.02)


def max_visible(seq_len: int, mask_ratio_min: float) -> int:
    """Most visible tokens a row can have when at least ceil(seq_len * mask_ratio_min) are masked.

    One token of slack guards against a ratio drawn a hair below mask_ratio_min in float32.
    """
    return min(seq_len, seq_len - math.ceil(seq_len * mask_ratio_min) + 1)


def patchify(latents, patch_size: int):
    """(B, h, w, C) NHWC latents -> (B, L, C*p*p) tokens; token index = row-major patch, channels (c, p, q)."""
    b, h, w, c = latents.shape
    p = patch_size
    x = latents.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # b, h', w', c, p, q
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens, patch_size: int, channels: int):
    """(B, L, C*p*p) -> (B, h, w, C) NHWC; inverse of `patchify` (square token grid)."""
    b, seq_len = tokens.shape[:2]
    p, c, s = patch_size, channels, math.isqrt(seq_len)
    x = tokens.reshape(b, s, s, c, p, p).transpose(0, 1, 4, 2, 5, 3)  # b, h', p, w', q, c
    return x.reshape(b, s * p, s * p, c)


class MAR(nn.Module):
    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    encoder_embed_dim: int = 1024
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    vae_embed_dim: int = 16
    class_num: int = 1000
    buffer_size: int = 64
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    diffloss_d: int = 3
    diffloss_w: int = 1024
    norm_eps: float = 1e-6  # blocks and encoder/decoder norms (z_proj_ln is always 1e-6, as official)
    # Training knobs the official MAR constructor takes too: masks hold >= ceil(L * mask_ratio_min) tokens (mask
    # ratio ~ TruncNormal(1, 0.25) on [mask_ratio_min, 1]), and DiffLoss sees each row diffusion_batch_mul times.
    mask_ratio_min: float = 0.7
    diffusion_batch_mul: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False
    scan_layers: bool = False

    # ---- static sizes -------------------------------------------------------------------------------------------
    @property
    def seq_h(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.seq_h * self.seq_h

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size ** 2

    def _block_kwargs(self, dim, heads):
        return dict(dim=dim, num_heads=heads, mlp_ratio=self.mlp_ratio, qkv_bias=True, norm_eps=self.norm_eps,
                    attn_drop=self.attn_dropout, proj_drop=self.proj_dropout, act="gelu_exact",
                    attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype)

    def setup(self):
        d, dd = self.encoder_embed_dim, self.decoder_embed_dim
        total = self.buffer_size + self.seq_len
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.class_emb = Embed(self.class_num, d, axes=("classes", "embed"), embedding_init=_normal02, **kw)
        self.fake_latent = self.param("fake_latent", with_axes(_normal02, (None, "embed")), (1, d), self.param_dtype)
        # encoder
        self.z_proj = Dense(d, axes=("latent", "embed"), **kw)
        self.z_proj_ln = LayerNorm(1e-6, **kw)
        self.encoder_pos_embed_learned = self.param(
            "encoder_pos_embed_learned", with_axes(_normal02, (None, None, "embed")), (1, total, d), self.param_dtype)
        self.encoder_blocks = BlockStack(self.encoder_depth, self._block_kwargs(d, self.encoder_num_heads),
                                         remat=self.remat, scan=self.scan_layers)
        self.encoder_norm = LayerNorm(self.norm_eps, **kw)
        # decoder ('embed' on one side only: a dim may appear once in a sharding spec)
        self.decoder_embed = Dense(dd, axes=("embed", None), **kw)
        self.mask_token = self.param("mask_token", with_axes(_normal02, (None, None, "embed")), (1, 1, dd),
                                     self.param_dtype)
        self.decoder_pos_embed_learned = self.param(
            "decoder_pos_embed_learned", with_axes(_normal02, (None, None, "embed")), (1, total, dd), self.param_dtype)
        self.decoder_blocks = BlockStack(self.decoder_depth, self._block_kwargs(dd, self.decoder_num_heads),
                                         remat=self.remat, scan=self.scan_layers)
        self.decoder_norm = LayerNorm(self.norm_eps, **kw)
        self.diffusion_pos_embed_learned = self.param(
            "diffusion_pos_embed_learned", with_axes(_normal02, (None, None, "embed")), (1, self.seq_len, dd),
            self.param_dtype)
        # per-token diffusion denoiser: predicts eps and the variance interpolation (2 x token_dim)
        self.diffloss = SimpleMLPAdaLN(in_channels=self.token_dim, model_channels=self.diffloss_w,
                                       out_channels=2 * self.token_dim, z_channels=dd,
                                       num_res_blocks=self.diffloss_d, **kw)

    # ---- tokens <-> latents -------------------------------------------------------------------------------------
    def patchify(self, latents):
        return patchify(latents, self.patch_size)

    def unpatchify(self, tokens):
        return unpatchify(tokens, self.patch_size, self.vae_embed_dim)

    # ---- conditioning -------------------------------------------------------------------------------------------
    def class_embedding(self, labels):
        return self.class_emb(labels)

    def null_embedding(self, batch: int):
        """The learned null class (`fake_latent`) for CFG's unconditional branch, (batch, D)."""
        return jnp.broadcast_to(self.fake_latent.astype(self.dtype), (batch, self.encoder_embed_dim))

    def _visible_with_buffer(self, mask):
        """(B, L) mask (1 / True = masked) -> (B, buffer + L) bool, True = visible; buffer always visible."""
        masked = jnp.asarray(mask).astype(bool)
        buf = jnp.ones((masked.shape[0], self.buffer_size), bool)
        return jnp.concatenate([buf, ~masked], axis=1)

    # ---- encoder / decoder --------------------------------------------------------------------------------------
    def forward_mae_encoder(self, tokens, mask, class_emb, train: bool = False, num_keep: Optional[int] = None,
                            keep_index: Optional[jax.Array] = None):
        """tokens (B, L, Ct), mask (B, L) 1 = masked, class_emb (B, D) -> (B, buffer + L, D).

        Label drop (p = label_drop_prob, replace by fake_latent) happens here when `train`, with the 'dropout' rng,
        as in the official encoder. Rows of masked tokens in the output are arbitrary (see module docstring).
        `num_keep` (static) runs the blocks on the buffer + the first num_keep visible tokens only; `keep_index`
        ((B, S) indices into buffer + L, static S) on exactly those rows, of which the masked ones are no keys.
        Either way the rows left out come back as 0.
        """
        b = tokens.shape[0]
        d = self.encoder_embed_dim
        x = self.z_proj(tokens)
        if train and self.label_drop_prob > 0:
            drop = jax.random.uniform(self.make_rng("dropout"), (b,)) < self.label_drop_prob
            class_emb = jnp.where(drop[:, None], self.fake_latent.astype(jnp.float32),
                                  class_emb.astype(jnp.float32))
        buf = jnp.broadcast_to(class_emb.astype(x.dtype)[:, None, :], (b, self.buffer_size, d))
        x = jnp.concatenate([buf, x], axis=1) + self.encoder_pos_embed_learned.astype(x.dtype)
        x = self.z_proj_ln(x)
        x = constrain(x, ("batch", "length", "embed"))
        visible = self._visible_with_buffer(mask)

        if keep_index is None and num_keep is not None and num_keep < self.seq_len:
            # Buffer + num_keep tokens, visible first in increasing position (stable sort keeps the order).
            keep_index = jnp.argsort((~visible).astype(jnp.int32), axis=1, stable=True)[:, :self.buffer_size + num_keep]
        if keep_index is None:
            x = self.encoder_blocks(x, visible[:, None, None, :], not train)
            return self.encoder_norm(x)
        xg = jnp.take_along_axis(x, keep_index[..., None], axis=1)
        keys = jnp.take_along_axis(visible, keep_index, axis=1)
        xg = self.encoder_norm(self.encoder_blocks(xg, keys[:, None, None, :], not train))
        out = jnp.zeros((b, x.shape[1], d), xg.dtype)
        return out.at[jnp.arange(b)[:, None], keep_index].set(xg)

    def forward_mae_decoder(self, x, mask, train: bool = False, positions: Optional[jax.Array] = None):
        """Encoder output (B, buffer + L, D) -> z (B, L, Dd): masked slots -> mask_token, decoder, + diffusion pos.

        `positions` ((B, Q) token indices in 0..L-1): return z of those tokens only, (B, Q, Dd); the last block then
        computes only those rows (a sampler needs the few tokens it reveals), the others still serve as keys."""
        x = self.decoder_embed(x)
        visible = self._visible_with_buffer(mask)
        x = jnp.where(visible[..., None], x, self.mask_token.astype(x.dtype))
        x = x + self.decoder_pos_embed_learned.astype(x.dtype)
        rows = None if positions is None else positions + self.buffer_size
        x = self.decoder_norm(self.decoder_blocks(x, None, not train, rows))
        if positions is None:
            return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned.astype(x.dtype)
        return x + self.diffusion_pos_embed_learned[0].astype(x.dtype)[positions]

    def __call__(self, tokens, labels, mask, train: bool = False, num_keep: Optional[int] = None):
        """tokens (B, L, Ct), labels (B,) int, mask (B, L) 1 = masked -> z (B, L, Dd) (label drop when train)."""
        if self.is_initializing():
            # Create the diffusion head's params too, so `init` with the default method gives the whole tree.
            self.denoise(jnp.zeros((1, self.token_dim), self.dtype), jnp.zeros((1,), jnp.int32),
                         jnp.zeros((1, self.decoder_embed_dim), self.dtype))
        x = self.forward_mae_encoder(tokens, mask, self.class_embedding(labels), train=train, num_keep=num_keep)
        return self.forward_mae_decoder(x, mask, train=train)

    # ---- diffusion head -----------------------------------------------------------------------------------------
    def denoise(self, x_t, t, c):
        """SimpleMLPAdaLN: x_t (N, Ct), t (N,) original timestep indices, c (N, Dd) -> (N, 2*Ct) [eps | var]."""
        return self.diffloss(x_t, t, c)

    def denoise_with_cfg(self, x_t, t, c, cfg_scale):
        """Official forward_with_cfg: rows are [cond half; uncond half] sharing x_t; eps mixed, variance kept."""
        return self.diffloss.forward_with_cfg(x_t, t, c, cfg_scale)

    def diffusion_time_embedding(self, t):
        """The denoiser's timestep embedding (N,) -> (N, W) (see SimpleMLPAdaLN.modulations)."""
        return self.diffloss.embed_time(t)

    def diffusion_condition_embedding(self, c):
        """The denoiser's condition embedding (N, Dd) -> (N, W)."""
        return self.diffloss.embed_condition(c)

    def diffusion_modulations(self, y):
        """The denoiser's adaLN chunks of every block for conditionings y (..., W) (SimpleMLPAdaLN.modulations)."""
        return self.diffloss.modulations(y)

    def denoise_modulated(self, x_t, mods):
        """`denoise` given the rows' `diffusion_modulations`."""
        return self.diffloss.forward_modulated(x_t, mods)

    def denoise_modulated_with_cfg(self, x_t, mods, cfg_scale):
        """`denoise_with_cfg` given the rows' `diffusion_modulations`."""
        return self.diffloss.forward_modulated_with_cfg(x_t, mods, cfg_scale)


def dummy_inputs(model: MAR, batch: int = 1):
    tokens = jnp.zeros((batch, model.seq_len, model.token_dim), model.dtype)
    labels = jnp.zeros((batch,), jnp.int32)
    mask = jnp.zeros((batch, model.seq_len), jnp.float32)
    return tokens, labels, mask


# The diffusion head's kernels every DDPM step multiplies (the adaLN ones run batched over steps, `modulate`).
HEAD_STEP_KERNELS = ("mlp_0", "mlp_2")


def init_params(model: MAR, rng: jax.Array):
    """Boxed params (logical-axis metadata kept) of the whole MAR incl. the diffusion head."""
    return model.init({"params": rng}, *dummy_inputs(model))["params"]


def head_step_params(params):
    """params with the res blocks' MLP kernels of the diffusion head out-major (`jaxgen.nn.kernel_layout`): what
    `embedded_denoiser`'s steps read when they run `kernel_layout.MIN_ROWS` rows or more on XLA:CPU. Make it
    outside the loops (one copy of those kernels per call)."""
    return kernel_layout.to_out_major(params, kernel_layout.dense_kernels(HEAD_STEP_KERNELS, within="diffloss"))


def embedded_denoiser(model: MAR, variables, guided: bool, step_params=None):
    """The diffusion head as `diffloss_sample`'s EmbeddedDenoiser: condition / timesteps embedded once per call, the
    adaLN modulations of several DDPM steps computed in one batch. `step_params`: the params the DDPM steps read
    (default variables["params"]), e.g. `head_step_params`, made outside the loop."""
    from jaxgen.diffusion.diffloss import EmbeddedDenoiser
    def step_variables():  # called inside the DDPM loop's body: XLA folds the in-major views into the dots
        return variables if step_params is None else {**variables, "params": kernel_layout.in_major(step_params)}

    def apply_step(*args, method):
        with kernel_layout.out_major_views() if step_params is not None else contextlib.nullcontext():
            return model.apply(step_variables(), *args, method=method)

    body = (lambda x_t, m, s: apply_step(x_t, m, s, method=MAR.denoise_modulated_with_cfg)) \
        if guided else (lambda x_t, m: apply_step(x_t, m, method=MAR.denoise_modulated))
    return EmbeddedDenoiser(time=lambda t: model.apply(variables, t, method=MAR.diffusion_time_embedding),
                            condition=lambda c: model.apply(variables, c, method=MAR.diffusion_condition_embedding),
                            body=body, modulate=lambda y: model.apply(variables, y, method=MAR.diffusion_modulations))
