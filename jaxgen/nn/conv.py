"""Convolutional building blocks shared by the VQ / KL image autoencoders (MAR's KL-VAE, VAR's VQVAE, MaskGIT's VQGAN).

Everything is NHWC. Conv kernels are (kh, kw, in, out) with logical axes (None, None, 'conv_in', 'conv_out'), i.e. a
torch Conv2d weight (O, I, kh, kw) transposed by (2, 3, 1, 0). Parameter names follow the torch attribute names of the
LDM-style autoencoders (`norm1`, `conv1`, `nin_shortcut`, `q`/`k`/`v`/`qkv`, `proj_out`, `conv`) so converters are
mechanical. Norms, softmax and attention logits are computed in float32; convs accumulate in float32.
"""
from __future__ import annotations

import functools
import math

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.kernels import cpu as cpu_kernels
from jaxgen.nn.dropout import Dropout
from jaxgen.nn.layers import ones, silu, with_axes, zeros

Dtype = Any
# int p: torch `padding=p` (p zeros on every side); ((top, bottom), (left, right)): explicit; "SAME": TF / timm
# Conv2dSame (total pad k-1 for stride 1, extra pixel at the end); "VALID": none.
Padding = Union[int, str, Sequence[Tuple[int, int]]]

# torch Conv2d's default init (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


swish = silu  # LDM's `nonlinearity`: torch SiLU, in torch's form (`jaxgen.nn.layers.silu`)


def _pairs(padding: Padding) -> Union[str, Tuple[Tuple[int, int], Tuple[int, int]]]:
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    (t, b), (l, r) = padding
    return ((int(t), int(b)), (int(l), int(r)))


def _subpixel_kernel(kernel):
    """3x3 kernel (3, 3, I, O) -> the 2x2 kernel (2, 2, I, 4 O) of `nearest_up2_conv3`, outputs ordered (a, b, O).

    Along one axis, output row 2i + a of the 3-tap conv over the nearest-upsampled input sees input rows
    (i - 1, i) with taps (k0, k1 + k2) when a = 0 and rows (i, i + 1) with taps (k0 + k1, k2) when a = 1."""
    def fold(k, axis):
        k0, k1, k2 = (jnp.take(k, i, axis=axis) for i in range(3))
        return jnp.stack([k0, k1 + k2], axis), jnp.stack([k0 + k1, k2], axis)

    rows = fold(kernel, 0)
    parts = [col for r in rows for col in fold(r, 1)]  # (a, b) = (0, 0), (0, 1), (1, 0), (1, 1)
    return jnp.concatenate(parts, axis=-1)


def nearest_up2_conv3(x, kernel, dtype=jnp.float32):
    """conv3x3(pad 1)(nearest_upsample_x2(x)) without building the upsampled image: one 2x2 conv with 4x the outputs on
    the zero-padded low-resolution input (sub-pixel form), then the four output phases interleaved. 16 instead of 36
    multiply-adds per input pixel and channel pair, and no 4x-sized upsampled copy; equal up to summation order
    (the folded taps k1 + k2 are summed before multiplying). x (B, H, W, I) -> (B, 2H, 2W, O) float32."""
    b, h, w, _ = x.shape
    out = kernel.shape[-1]
    xp = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = jax.lax.conv_general_dilated(xp, _subpixel_kernel(kernel.astype(jnp.float32)).astype(dtype), (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     preferred_element_type=jnp.float32)  # (B, H + 1, W + 1, 4 O)
    y = y.reshape(b, h + 1, w + 1, 2, 2, out)
    # phase (a, b) of output pixel (i, j) is y[i + a, j + b, a, b]
    phases = [[y[:, a:a + h, c:c + w, a, c] for c in range(2)] for a in range(2)]
    return jnp.stack([jnp.stack(r, axis=3) for r in phases], axis=2).reshape(b, 2 * h, 2 * w, out)


class Conv(nn.Module):
    """2-D convolution on NHWC input with torch padding semantics.

    `padding` as torch's int (symmetric zeros), explicit ((top, bottom), (left, right)) pairs (torch F.pad(x, (l, r, t, b))
    followed by an unpadded conv), or 'SAME' / 'VALID'. Params: `kernel` (kh, kw, in, out), `bias` (out,).
    `upsample_nearest2`: the input is first upsampled x2 (nearest), as torch interpolate + Conv2d(3, padding=1);
    computed by `nearest_up2_conv3` (3x3, stride 1, padding 1 only).
    """

    features: int
    kernel_size: Union[int, Tuple[int, int]] = 3
    strides: int = 1
    padding: Padding = 0
    use_bias: bool = True
    kernel_init: Callable = torch_conv_init
    bias_init: Callable = zeros
    upsample_nearest2: bool = False
    # None: the platform's default (bf16 passes / TF32 on TPU / GPU); "highest" for full float32 (FID's Inception).
    precision: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kh, kw = (self.kernel_size, self.kernel_size) if isinstance(self.kernel_size, int) else self.kernel_size
        kernel = self.param("kernel", with_axes(self.kernel_init, (None, None, "conv_in", "conv_out")),
                            (kh, kw, x.shape[-1], self.features), self.param_dtype)
        bias = (self.param("bias", with_axes(self.bias_init, ("conv_out",)), (self.features,), self.param_dtype)
                if self.use_bias else None)
        same3 = (kh, kw) == (3, 3) and self.strides == 1 and _pairs(self.padding) in (((1, 1), (1, 1)), "SAME")
        if self.upsample_nearest2 and not same3:
            raise ValueError("upsample_nearest2 needs a 3x3 conv with stride 1 and padding 1")
        if (same3 and self.precision is None and jnp.dtype(self.dtype) == jnp.float32
                and cpu_kernels.wanted_winograd(x.shape, kernel.shape, x.dtype, self.upsample_nearest2)):
            # XLA:CPU's conv at 2 x 256 x 256 x 160 -> 160: ~200 ms; Winograd F(4x4, 3x3): ~80 ms, within 1e-5
            return cpu_kernels.winograd_conv3(x, kernel, bias, self.upsample_nearest2).astype(self.dtype)
        if self.upsample_nearest2:
            y = nearest_up2_conv3(x, kernel, self.dtype)
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(self.dtype), kernel.astype(self.dtype),
                window_strides=(self.strides, self.strides), padding=_pairs(self.padding),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision,
                preferred_element_type=jnp.float32)
        if bias is not None:
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def _group_norm_reference(x, scale, bias, num_groups: int, epsilon: float, silu: bool):
    """XLA's GroupNorm (+ SiLU): statistics in float32 (see `GroupNorm`)."""
    c = x.shape[-1]
    x32 = x.astype(jnp.float32)
    # Statistics as per-channel sums over the spatial dims first (a reduction XLA:CPU vectorizes along the
    # contiguous channels), then summed within each group: same two-pass mean / variance, other summation
    # order. GN + SiLU at 2 x 256 x 256 x 128 (a VQVAE decoder's top level): 61 -> 35 ms against reducing the
    # interleaved (spatial, group channels) axes directly.
    per_group = c // num_groups
    spatial = tuple(range(1, x.ndim - 1))
    count = per_group * math.prod(x.shape[1:-1])
    channels_shape = (x.shape[0],) + (1,) * len(spatial) + (c,)

    def group_total(channel_sums):  # (B, C) -> (B, 1.., C): its group's sum at every channel
        groups = channel_sums.reshape(-1, num_groups, per_group).sum(-1)
        return jnp.repeat(groups, per_group, axis=-1).reshape(channels_shape)

    mean = group_total(jnp.sum(x32, axis=spatial)) / count
    var = group_total(jnp.sum(jnp.square(x32 - mean), axis=spatial)) / count
    y = (x32 - mean) * jax.lax.rsqrt(var + epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return swish(y) if silu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm_kernel(x, scale, bias, num_groups, epsilon, silu):
    return cpu_kernels.group_norm(x, scale, bias, num_groups, epsilon, silu)


def _group_norm_kernel_fwd(x, scale, bias, num_groups, epsilon, silu):
    return _group_norm_kernel(x, scale, bias, num_groups, epsilon, silu), (x, scale, bias)


def _group_norm_kernel_bwd(num_groups, epsilon, silu, saved, g):
    # rarely needed (the kernel serves inference): XLA's gradient of the reference, its forward recomputed
    _, pullback = jax.vjp(lambda *a: _group_norm_reference(*a, num_groups, epsilon, silu), *saved)
    return pullback(g)


_group_norm_kernel.defvjp(_group_norm_kernel_fwd, _group_norm_kernel_bwd)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm on NHWC: channel c belongs to group c // (C / num_groups); biased variance over (H, W, group
    channels), eps inside the sqrt, statistics in float32. Params `scale` / `bias` (torch `weight` / `bias`).

    `silu=True` applies torch's SiLU after (the autoencoders' `swish(norm(x))`). With `deterministic=True` (inference)
    on XLA:CPU in float32 both run as one jaxgen kernel (`jaxgen.kernels.cpu.group_norm`: x read twice instead of
    three times; a VQVAE decoder's 2 x 256 x 256 x 160 GN + SiLU 41 -> 11 ms); training keeps XLA's ops."""

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, silu: bool = False, deterministic: bool = False):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
        scale = self.param("scale", with_axes(ones, ("norm",)), (c,), self.param_dtype)
        bias = self.param("bias", with_axes(zeros, ("norm",)), (c,), self.param_dtype)
        if deterministic and cpu_kernels.wanted_group_norm(x.dtype):
            y = _group_norm_kernel(x, scale, bias, self.num_groups, float(self.epsilon), bool(silu))
        else:
            y = _group_norm_reference(x, scale, bias, self.num_groups, self.epsilon, silu)
        return y.astype(self.dtype)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3 -> GN -> swish -> dropout -> conv3, plus a residual.

    When channels change a 1x1 `nin_shortcut` maps the residual:
      shortcut='input'  (LDM / MAR KL-VAE / VAR): out = nin_shortcut(x) + h, kernel in -> out.
      shortcut='output' (MaskGIT-VQGAN quirk):   out = h + nin_shortcut(h), kernel out -> out (the input is dropped).
    `use_bias=False` gives MaskGIT's bias-free convs. Dropout draws from the 'dropout' rng when not deterministic.
    """

    out_channels: Optional[int] = None
    dropout: float = 0.0
    shortcut: str = "input"
    use_bias: bool = True
    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if self.shortcut not in ("input", "output"):
            raise ValueError(f"ResnetBlock.shortcut must be 'input' or 'output', got {self.shortcut!r}")
        c_in = x.shape[-1]
        c_out = self.out_channels or c_in
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(num_groups=self.num_groups, epsilon=self.epsilon, **kw)
        h = GroupNorm(name="norm1", **norm)(x, silu=True, deterministic=deterministic)
        h = Conv(c_out, 3, padding=1, use_bias=self.use_bias, name="conv1", **kw)(h)
        h = GroupNorm(name="norm2", **norm)(h, silu=True, deterministic=deterministic)
        h = Dropout(self.dropout)(h, deterministic=deterministic or self.dropout == 0.0)
        h = Conv(c_out, 3, padding=1, use_bias=self.use_bias, name="conv2", **kw)(h)
        if c_in == c_out:
            return x + h
        shortcut = Conv(c_out, 1, use_bias=self.use_bias, name="nin_shortcut", **kw)
        if self.shortcut == "input":
            return shortcut(x) + h
        return h + shortcut(h)


class Downsample(nn.Module):
    """x2 downsampling. with_conv: zero-pad bottom/right by one (torch pad (0, 1, 0, 1)) then a stride-2 3x3 conv
    (`conv`) with no padding; otherwise 2x2 average pooling."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.with_conv:
            return Conv(x.shape[-1], 3, strides=2, padding=((0, 1), (0, 1)), name="conv",
                        dtype=self.dtype, param_dtype=self.param_dtype)(x)
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4), dtype=jnp.float32).astype(x.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (torch interpolate mode='nearest', scale 2) then, with_conv, a 3x3 conv (`conv`, pad 1),
    the two in the sub-pixel form of `nearest_up2_conv3` (or, where `Conv` takes Winograd's kernel, with the
    upsampling read in place)."""

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.with_conv:
            return Conv(x.shape[-1], 3, padding=1, upsample_nearest2=True, name="conv", dtype=self.dtype,
                        param_dtype=self.param_dtype)(x)
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual: x + proj_out(softmax(q k^T * C^-1/2) v) over the H*W positions.

    fused_qkv=False: separate 1x1 convs `q`, `k`, `v` (LDM, MAR KL-VAE); True: one 1x1 conv `qkv` with C -> 3C output
    channels laid out [q | k | v] (VAR). Logits and softmax in float32.
    """

    fused_qkv: bool = False
    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(num_groups=self.num_groups, epsilon=self.epsilon, name="norm", **kw)(x)
        if self.fused_qkv:
            q, k, v = jnp.split(Conv(3 * c, 1, name="qkv", **kw)(h), 3, axis=-1)
        else:
            q, k, v = (Conv(c, 1, name=n, **kw)(h) for n in ("q", "k", "v"))
        q, k, v = (t.reshape(b, hgt * wid, c) for t in (q, k, v))
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bij,bjc->bic", weights, v, preferred_element_type=jnp.float32).astype(self.dtype)
        return x + Conv(c, 1, name="proj_out", **kw)(out.reshape(b, hgt, wid, c))
