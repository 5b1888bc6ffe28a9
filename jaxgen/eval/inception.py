"""FID's Inception-v3 in Flax: the TF 2015-12-05 graph as pytorch-fid / torch-fidelity run it ('inception-v3-compat').

    net = InceptionFID.load("pt_inception-2015-12-05-6726825d.pth")   # pytorch-fid / torch-fidelity file, no torch
    feats = net(images_uint8_nhwc)          # {'2048': pool3 (N, 2048), 'logits_unbiased': (N, 1008), ...}

Numerics follow torch-fidelity's FeatureExtractorInceptionV3: uint8 -> float32 in [0, 255] -> ALWAYS resized to 299 x 299
by TF1 bilinear (no half-pixel centres, no antialias) -> (x - 128) / 128 -> BasicConv2d = conv (no bias) -> BatchNorm
(eps 1e-3, running statistics) -> ReLU; the avg-pool branches exclude the padding from the count; Mixed_7c's pool branch
is a 3 x 3 max pool. Convolutions run at full float32 precision on every platform (TF32 / bf16 passes would move FID).
Parameter names are the torch module names, so the weights convert key by key (`convert_state_dict`).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.torch_layout import conv2d, linear
from jaxgen.nn.conv import Conv
from jaxgen.nn.resize import resize

INPUT_SIZE = 299
FEATURES = ("64", "192", "768", "2048", "logits_unbiased", "logits")
NUM_LOGITS = 1008
BN_EPS = 1e-3
_HIGHEST = "highest"


# ---------------------------------------------------------------------------------------------- layers

class BasicConv2d(nn.Module):
    """conv (no bias) -> eval-mode BatchNorm -> ReLU. The running statistics are params: the net is frozen."""

    features: int
    kernel_size: Tuple[int, int] = (1, 1)
    strides: int = 1
    padding: Tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        (ph, pw) = self.padding
        y = Conv(self.features, self.kernel_size, self.strides, ((ph, ph), (pw, pw)), use_bias=False,
                 precision=_HIGHEST, name="conv")(x)
        return nn.relu(_BatchNorm(name="bn")(y))


class _BatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
        return (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias


def _conv(features, kernel=1, strides=1, padding=0, name=None):
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    return BasicConv2d(features, kernel, strides, padding, name=name)


def max_pool3(x, strides: int, padding: int = 0):
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, strides, strides, 1), pad)


def avg_pool3_exclude_pad(x):
    """3 x 3, stride 1, padding 1 average with count_include_pad=False: border windows divide by their real size."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return total / count


# ---------------------------------------------------------------------------------------------- blocks

class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = _conv(64, name="branch1x1")(x)
        b5 = _conv(64, 5, padding=2, name="branch5x5_2")(_conv(48, name="branch5x5_1")(x))
        b3 = _conv(64, name="branch3x3dbl_1")(x)
        b3 = _conv(96, 3, padding=1, name="branch3x3dbl_3")(_conv(96, 3, padding=1, name="branch3x3dbl_2")(b3))
        bp = _conv(self.pool_features, name="branch_pool")(avg_pool3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _conv(384, 3, strides=2, name="branch3x3")(x)
        bd = _conv(64, name="branch3x3dbl_1")(x)
        bd = _conv(96, 3, strides=2, name="branch3x3dbl_3")(_conv(96, 3, padding=1, name="branch3x3dbl_2")(bd))
        return jnp.concatenate([b3, bd, max_pool3(x, 2)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = _conv(192, name="branch1x1")(x)
        b7 = _conv(c7, name="branch7x7_1")(x)
        b7 = _conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = _conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = _conv(c7, name="branch7x7dbl_1")(x)
        bd = _conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = _conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = _conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = _conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = _conv(192, name="branch_pool")(avg_pool3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = _conv(320, 3, strides=2, name="branch3x3_2")(_conv(192, name="branch3x3_1")(x))
        b7 = _conv(192, name="branch7x7x3_1")(x)
        b7 = _conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = _conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = _conv(192, 3, strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, max_pool3(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (avg pool, padding excluded) and Mixed_7c (`max_pool=True`: the TF graph's max pool)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = _conv(320, name="branch1x1")(x)
        b3 = _conv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([_conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              _conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = _conv(384, 3, padding=1, name="branch3x3dbl_2")(_conv(448, name="branch3x3dbl_1")(x))
        bd = jnp.concatenate([_conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              _conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = max_pool3(x, 1, padding=1) if self.max_pool else avg_pool3_exclude_pad(x)
        bp = _conv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# ---------------------------------------------------------------------------------------------- network

def preprocess(images_uint8):
    """uint8 (N, H, W, 3) -> float32 (N, 299, 299, 3) in [-1, 1): TF1 bilinear resize, then (x - 128) / 128."""
    x = resize(images_uint8.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE), method="tf1_bilinear")
    return (x - 128.0) / 128.0


class InceptionV3(nn.Module):
    """uint8 NHWC images (any size, 3 channels) -> the six torch-fidelity features. Each top-level child's output is
    also sown into 'intermediates' as <child>_out (NHWC) for localising a mismatch."""

    @nn.compact
    def __call__(self, images_uint8) -> Dict[str, jax.Array]:
        x = preprocess(images_uint8)
        feats = {}

        def child(name, fn, y):
            y = fn(y)
            self.sow("intermediates", name + "_out", y)
            return y

        x = child("Conv2d_1a_3x3", _conv(32, 3, strides=2, name="Conv2d_1a_3x3"), x)
        x = child("Conv2d_2a_3x3", _conv(32, 3, name="Conv2d_2a_3x3"), x)
        x = child("Conv2d_2b_3x3", _conv(64, 3, padding=1, name="Conv2d_2b_3x3"), x)
        x = child("MaxPool_1", lambda y: max_pool3(y, 2), x)
        feats["64"] = x.mean((1, 2))
        x = child("Conv2d_3b_1x1", _conv(80, name="Conv2d_3b_1x1"), x)
        x = child("Conv2d_4a_3x3", _conv(192, 3, name="Conv2d_4a_3x3"), x)
        x = child("MaxPool_2", lambda y: max_pool3(y, 2), x)
        feats["192"] = x.mean((1, 2))
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = child(name, InceptionA(pool_features, name=name), x)
        x = child("Mixed_6a", InceptionB(name="Mixed_6a"), x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = child(name, InceptionC(c7, name=name), x)
        feats["768"] = x.mean((1, 2))
        x = child("Mixed_7a", InceptionD(name="Mixed_7a"), x)
        x = child("Mixed_7b", InceptionE(name="Mixed_7b"), x)
        x = child("Mixed_7c", InceptionE(max_pool=True, name="Mixed_7c"), x)
        x = child("AvgPool", lambda y: y.mean((1, 2), keepdims=True), x)
        pool3 = x.reshape(x.shape[0], -1)
        feats["2048"] = pool3
        kernel = self.param("fc_kernel", nn.initializers.zeros, (pool3.shape[-1], NUM_LOGITS), jnp.float32)
        bias = self.param("fc_bias", nn.initializers.zeros, (NUM_LOGITS,), jnp.float32)
        feats["logits_unbiased"] = jnp.dot(pool3, kernel, precision=_HIGHEST)
        feats["logits"] = feats["logits_unbiased"] + bias
        return feats


# ---------------------------------------------------------------------------------------------- weights

_BN = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))


def convert_state_dict(sd: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    """torch-fidelity / pytorch-fid Inception state_dict -> InceptionV3 params. Every BasicConv2d `X.conv.weight` with
    its `X.bn.*`; `fc`; `num_batches_tracked` and the unused `AuxLogits.*` are dropped. Missing entries raise."""
    params: Dict[str, Any] = {}
    prefixes = sorted({k[: -len(".conv.weight")] for k in sd if k.endswith(".conv.weight")
                       and not k.startswith("AuxLogits.")})
    if not prefixes or "fc.weight" not in sd:
        raise KeyError("not an Inception-v3 FID state_dict (no '*.conv.weight' / 'fc.weight' entries)")
    for prefix in prefixes:
        node = params
        for part in prefix.split("."):
            node = node.setdefault(part, {})
        node["conv"] = {"kernel": conv2d(sd, prefix + ".conv", bias=False)["kernel"]}
        node["bn"] = {ours: np.asarray(sd[f"{prefix}.bn.{theirs}"], np.float32) for theirs, ours in _BN}
    fc = linear(sd, "fc")
    params["fc_kernel"], params["fc_bias"] = fc["kernel"], fc["bias"]
    return params


def _check_params(params) -> None:
    """The converted tree must match the network's exactly (a wrong file fails here, not with a shape error deep in
    XLA)."""
    expected = jax.eval_shape(lambda: InceptionV3().init(jax.random.PRNGKey(0),
                                                         jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)))
    want = {jax.tree_util.keystr(p): tuple(v.shape)
            for p, v in jax.tree_util.tree_flatten_with_path(nn.unbox(expected["params"]))[0]}
    got = {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or extra or bad:
        raise ValueError(f"Inception weights do not fit the FID Inception-v3: missing {missing[:3]}, unexpected "
                         f"{extra[:3]}, wrong shapes {[(k, got[k], want[k]) for k in bad[:3]]}")


@functools.lru_cache(maxsize=4)
def _load_params(path: str):
    from jaxgen.convert.io import load_state_dict

    params = convert_state_dict(load_state_dict(path))
    _check_params(params)
    return params


class InceptionFID:
    """The frozen net with its weights: `net(images)` -> features on the host (float32 numpy), in fixed-size padded
    batches (one compilation), the batch sharded over `mesh`'s batch axes when given."""

    def __init__(self, params, batch_size: int = 100, mesh=None, rules: Optional[Sequence] = None):
        if mesh is not None:  # replicated once, not copied to the devices with every batch
            from jaxgen.train.restore import replicate

            self.params = replicate(params, mesh)
        else:
            self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.batch_size = int(batch_size)
        self.mesh, self.rules = mesh, rules
        self._apply = jax.jit(lambda p, x: InceptionV3().apply({"params": p}, x))

    @classmethod
    def load(cls, path: str, **kw) -> "InceptionFID":
        """From the user's pytorch-fid `pt_inception-2015-12-05-6726825d.pth` / torch-fidelity
        `weights-inception-2015-12-05-6726825d.pth` (read without PyTorch), or an .npz / .safetensors of it."""
        return cls(_load_params(str(path)), **kw)

    def __call__(self, images_uint8: np.ndarray, features: Sequence[str] = ("2048", "logits_unbiased")
                 ) -> Dict[str, np.ndarray]:
        from jaxgen.eval.features import batched_apply

        images = np.asarray(images_uint8)
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise ValueError(f"Inception features need uint8 (N, H, W, 3) images; got {images.dtype} {images.shape}")
        if images.shape[-1] == 1:  # grayscale data: the usual FID convention, the same gray in each channel
            images = np.repeat(images, 3, axis=-1)
        return batched_apply(lambda x: {k: v for k, v in self._apply(self.params, x).items() if k in features},
                             images, self.batch_size, self.mesh, self.rules)
