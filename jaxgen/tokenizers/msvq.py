"""VAR's multi-scale residual VQ tokenizer (FoundationVision/VAR `VQVAE` + `VectorQuantizer2`), NHWC, trainable.

An image is encoded to f (B, h, w, Cvae) (h = w = the last patch number). For each scale si with size pn the residual
f_rest is area-resized to pn x pn and quantised against one plain codebook; the code map is bicubic-upsampled back to
h x w, passed through phi_si(h) = (1 - r) h + r conv3x3(h), added to f_hat and subtracted from f_rest. Token maps are
flattened row-major. The resizes are torch-exact (`jaxgen.nn.resize`), so indices match the official model.

Parameter tree (mirrors the torch names so the converter is mechanical):
  encoder, decoder: the shared LDM conv encoder / decoder (`jaxgen.nn.conv_autoencoder`: down_{i}/block_{j},
           down_{i}/attn_{j}, mid/attn_1, ...), attention with a fused qkv conv on the deepest level and in the mid block
  quant_conv, post_quant_conv, codebook (V, Cvae), qresi_{k} (the phi convs).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.nn.conv import Conv
from jaxgen.nn.conv_autoencoder import ConvDecoder, ConvEncoder
from jaxgen.nn.layers import with_axes
from jaxgen.nn.quantizer import code_counts, commitment_loss, nearest_code, nearest_code_cosine
from jaxgen.nn.resize import resize

Dtype = Any

# PhiPartiallyShared with 4 convs over 10 scales: argmin |ticks - si/9| with ticks linspace(1/12, 11/12, 4). si = 2 and 7
# are exact ties that float rounding breaks towards the lower / upper conv; the official checkpoints depend on this table.
PHI_TABLE_10_SCALES_4_CONVS = (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)


def num_phi(share_quant_resi: int, num_scales: int, default_qresi_counts: int = 0) -> int:
    """How many phi convs the quantizer owns (0: one per scale, 1: a single shared one, K >= 2: K partially shared)."""
    if share_quant_resi == 0:
        return default_qresi_counts or num_scales
    if share_quant_resi == 1:
        return 1
    return share_quant_resi


def phi_index(si: int, num_scales: int, share_quant_resi: int = 4, default_qresi_counts: int = 0) -> int:
    """Which phi conv scale `si` uses: the official nearest-tick rule (ticks linspace(1/3K, 1-1/3K, K) when K == 4,
    else linspace(1/2K, 1-1/2K, K)), evaluated in float64 numpy like the official code; the 10-scale, 4-conv table is fixed."""
    k = num_phi(share_quant_resi, num_scales, default_qresi_counts)
    if k == 1 or num_scales == 1:
        return 0
    if k == 4 and num_scales == 10:
        return PHI_TABLE_10_SCALES_4_CONVS[si]
    ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return int(np.argmin(np.abs(ticks - si / (num_scales - 1))))


def codebook_init(vocab_size: int) -> Callable:
    # taming / VAR `eini < 0`: U(-1/V, 1/V). Small codes are pulled out by the codebook loss and the dead-code policy.
    return nn.initializers.uniform(scale=2.0 / vocab_size) if vocab_size else nn.initializers.zeros


def _shifted_uniform(init: Callable, shift: float) -> Callable:
    def f(key, shape, dtype=jnp.float32):
        return init(key, shape, dtype) - jnp.asarray(shift, dtype)
    return f


class VQVAE(nn.Module):
    """The official VAR VQVAE (defaults: the released vae_ch160v4096z32 config)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    dropout: float = 0.0
    num_groups: int = 32  # official 32; tiny configs need fewer (channels must divide)
    beta: float = 0.25
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # VAR puts attention (one fused qkv conv) on the deepest level and in the mid block.
        arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    attn_levels=(len(self.ch_mult) - 1,) if self.using_sa else (), mid_attn=self.using_mid_sa,
                    fused_qkv=True, dropout=self.dropout, num_groups=self.num_groups, **kw)
        self.encoder = ConvEncoder(out_channels=self.z_channels, **arch)
        self.decoder = ConvDecoder(out_channels=self.in_channels, **arch)
        pad = self.quant_conv_ks // 2
        self.quant_conv = Conv(self.z_channels, self.quant_conv_ks, padding=pad, **kw)
        self.post_quant_conv = Conv(self.z_channels, self.quant_conv_ks, padding=pad, **kw)
        v = self.vocab_size
        self.codebook = self.param("codebook", with_axes(_shifted_uniform(codebook_init(v), 1.0 / v), ("vocab", "latent")),
                                   (v, self.z_channels), self.param_dtype)
        if abs(self.quant_resi) > 1e-6:
            k = num_phi(self.share_quant_resi, len(self.v_patch_nums), self.default_qresi_counts)
            # the attribute name gives the param names qresi_0 .. qresi_{k-1} (torch quantize.quant_resi.qresi_ls.k)
            self.qresi = [Conv(self.z_channels, 3, padding=1, **kw) for _ in range(k)]
        else:
            self.qresi = []

    # ------------------------------------------------------------------ pieces
    @property
    def num_scales(self) -> int:
        return len(self.v_patch_nums)

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.v_patch_nums)

    def encode(self, img, train: bool = False):
        """Image NHWC in [-1, 1] -> f (B, h, w, Cvae) = quant_conv(encoder(img))."""
        return self.quant_conv(self.encoder(img, deterministic=not train))

    def decode(self, f_hat, train: bool = False):
        """f_hat -> decoder(post_quant_conv(f_hat)), not clamped (the training reconstruction)."""
        return self.decoder(self.post_quant_conv(f_hat), deterministic=not train)

    def fhat_to_img(self, f_hat):
        return jnp.clip(self.decode(f_hat).astype(jnp.float32), -1.0, 1.0)

    def phi(self, si: int, h):
        """phi_si(h) = (1 - r) h + r conv3x3(h), r = |quant_resi| (identity when quant_resi ~ 0)."""
        if not self.qresi:
            return h
        r = abs(self.quant_resi)
        conv = self.qresi[phi_index(si, self.num_scales, self.share_quant_resi, self.default_qresi_counts)]
        return h * (1.0 - r) + conv(h) * r

    def embed(self, idx):
        """Code ids (...) -> code vectors (..., Cvae)."""
        return jnp.take(self.codebook, idx, axis=0).astype(jnp.float32)

    def idx_map(self, idx_bl, pn: int):
        """(B, pn*pn) row-major ids -> (B, pn, pn, Cvae) code map."""
        return self.embed(idx_bl).reshape(idx_bl.shape[0], pn, pn, self.z_channels)

    def _lookup(self, z):
        cb = jax.lax.stop_gradient(self.codebook)
        return nearest_code_cosine(z, cb) if self.using_znorm else nearest_code(z, cb)

    def _up(self, si: int, h, size: int):
        # every scale but the last is bicubic-upsampled to the full map before phi ("conv after upsample")
        return h if si == self.num_scales - 1 else resize(h, (size, size), "bicubic")

    # ------------------------------------------------------------------ quantisation
    def quantize(self, f) -> Tuple[List[jax.Array], List[jax.Array]]:
        """Residual multi-scale quantisation of f (B, H, W, C) -> ([idx (B, pn*pn) int32 per scale], [f_hat per scale]).

        Gradients flow to the codebook and phi convs through each f_hat (the lookups use stop-gradient features).
        """
        idx_list, fhat_list, _ = self._quantize(f)
        return idx_list, fhat_list

    def _quantize(self, f) -> Tuple[List[jax.Array], List[jax.Array], List[jax.Array]]:
        """`quantize` plus what each scale looked up: [(B, pn*pn, C) stop-gradient quantiser inputs]."""
        b, hh, ww, c = f.shape
        if (hh, ww) != (self.v_patch_nums[-1],) * 2:
            raise ValueError(f"feature map {hh}x{ww} does not match the last patch number {self.v_patch_nums[-1]}")
        f = f.astype(jnp.float32)
        f_rest = jax.lax.stop_gradient(f)
        f_hat = jnp.zeros_like(f)
        idx_list, fhat_list, z_list = [], [], []
        for si, pn in enumerate(self.v_patch_nums):
            z = f_rest if si == self.num_scales - 1 else resize(f_rest, (pn, pn), "area")
            z = jax.lax.stop_gradient(z).reshape(b, pn * pn, c)
            idx = jax.lax.stop_gradient(self._lookup(z.reshape(-1, c))).reshape(b, pn * pn)
            h = self.phi(si, self._up(si, self.idx_map(idx, pn), hh))
            f_hat = f_hat + h
            f_rest = f_rest - jax.lax.stop_gradient(h)
            idx_list.append(idx)
            fhat_list.append(f_hat)
            z_list.append(z)
        return idx_list, fhat_list, z_list

    def f_to_idx(self, f) -> List[jax.Array]:
        return self.quantize(f)[0]

    def f_to_fhat(self, f) -> List[jax.Array]:
        return self.quantize(f)[1]

    def img_to_idx(self, img) -> List[jax.Array]:
        return self.quantize(self.encode(img))[0]

    def idx_to_fhat(self, idx_list: Sequence[jax.Array]) -> List[jax.Array]:
        """Per-scale token lists -> cumulative f_hat after each scale (every scale upsampled to the full map)."""
        size = self.v_patch_nums[-1]
        f_hat = jnp.zeros((idx_list[0].shape[0], size, size, self.z_channels), jnp.float32)
        out = []
        for si, idx in enumerate(idx_list):
            pn = int(round(idx.shape[1] ** 0.5))
            f_hat = f_hat + self.phi(si, self._up(si, self.idx_map(idx, pn), size))
            out.append(f_hat)
        return out

    def idx_to_img(self, idx_list: Sequence[jax.Array], last_one: bool = True):
        fhats = self.idx_to_fhat(idx_list)
        return self.fhat_to_img(fhats[-1]) if last_one else [self.fhat_to_img(fh) for fh in fhats]

    def img_to_reconstructed_img(self, img, last_one: bool = True):
        fhats = self.quantize(self.encode(img))[1]
        return self.fhat_to_img(fhats[-1]) if last_one else [self.fhat_to_img(fh) for fh in fhats]

    def idx_to_var_input(self, idx_list: Sequence[jax.Array]):
        """Teacher-forcing input (B, L - first_l, Cvae): after each scale si < S-1 the running f_hat is area-resized to
        the next scale's size and flattened row-major."""
        size = self.v_patch_nums[-1]
        b = idx_list[0].shape[0]
        f_hat = jnp.zeros((b, size, size, self.z_channels), jnp.float32)
        nexts = []
        for si in range(self.num_scales - 1):
            pn = self.v_patch_nums[si]
            f_hat = f_hat + self.phi(si, resize(self.idx_map(idx_list[si], pn), (size, size), "bicubic"))
            pn_next = self.v_patch_nums[si + 1]
            nexts.append(resize(f_hat, (pn_next, pn_next), "area").reshape(b, pn_next * pn_next, self.z_channels))
        return jnp.concatenate(nexts, axis=1)

    def next_ar_input(self, si: int, f_hat, h):
        """Sampler step: add scale si's code map h (B, pn, pn, Cvae) to f_hat; return (f_hat, next scale's input map)."""
        size = self.v_patch_nums[-1]
        if si != self.num_scales - 1:
            f_hat = f_hat + self.phi(si, resize(h.astype(jnp.float32), (size, size), "bicubic"))
            pn = self.v_patch_nums[si + 1]
            return f_hat, resize(f_hat, (pn, pn), "area")
        f_hat = f_hat + self.phi(si, h.astype(jnp.float32))
        return f_hat, f_hat

    # ------------------------------------------------------------------ training forward
    def __call__(self, img, train: bool = True) -> Dict[str, jax.Array]:
        """Training forward (the official VQVAE.forward): recon = decode(straight-through f_hat),
        vq_loss = mean over scales of beta*|sg(f_hat_s) - f|^2 + |f_hat_s - sg(f)|^2; counts (S, V) code hits per scale;
        f: encoder features; z: (B, L, C) what every scale looked up (the residuals the codebook has to cover, e.g.
        the candidates of a dead-code policy)."""
        f = self.encode(img, train).astype(jnp.float32)
        idx_list, fhat_list, z_list = self._quantize(f)
        vq_loss = sum(commitment_loss(f, fh, self.beta) for fh in fhat_list) / self.num_scales
        f_st = f + jax.lax.stop_gradient(fhat_list[-1] - f)
        recon = self.decode(f_st, train).astype(jnp.float32)
        counts = jnp.stack([code_counts(idx, self.vocab_size) for idx in idx_list])
        return {"recon": recon, "vq_loss": vq_loss, "counts": counts, "f": f, "z": jnp.concatenate(z_list, axis=1),
                "idx": idx_list}
