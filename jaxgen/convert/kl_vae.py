"""Official MAR KL-VAE weights (`kl16.ckpt`, LDM AutoencoderKL keys) -> jaxgen.tokenizers.kl_vae params.

The released file wraps the state dict as {"model": state_dict}; unwrapping is the caller's job. Keys map mechanically:
a numeric list index is folded into the preceding name (`encoder.down.1.attn.0.q` -> encoder/down_1/attn_0/q), conv
`weight` (O, I, kh, kw) -> `kernel` (kh, kw, I, O), GroupNorm `weight` -> `scale`, `bias` -> `bias`.

LDM training checkpoints also carry the loss module (`loss.*`: LPIPS net, discriminator, learned logvar); those keys are
not part of the autoencoder and are skipped. Any other key the model has no place for, any missing key and any shape
mismatch raises ValueError listing them.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.torch_layout import check_tree_shapes, conv2d
from jaxgen.tokenizers.kl_vae import AutoencoderKL

IGNORED_PREFIXES = ("loss.",)
Path = Tuple[str, ...]


def kl_vae_module(config) -> AutoencoderKL:
    """The AutoencoderKL of a run config / its config.model / a mapping of fields (strict); None: the official KL-16."""
    if config is None:
        return AutoencoderKL()
    from jaxgen import strict

    model_cfg = config.model if "model" in config else config
    return strict.build(AutoencoderKL, model_cfg, "AutoencoderKL fields")


def expected_shapes(model: AutoencoderKL) -> Dict[Path, Tuple[int, ...]]:
    """Param path -> shape of the model, computed abstractly (no allocation)."""
    x = jax.ShapeDtypeStruct((1, model.resolution, model.resolution, model.in_channels), jnp.float32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype),
                                              sample_posterior=False))["params"]
    params = nn.meta.unbox(boxed)
    return {tuple(k.key for k in path): tuple(v.shape) for path, v in jax.tree_util.tree_leaves_with_path(params)}


def _module_path(prefix: str) -> Path:
    out = []
    for tok in prefix.split("."):
        if tok.isdigit() and out:
            out[-1] = f"{out[-1]}_{tok}"
        else:
            out.append(tok)
    return tuple(out)


def _torch_name(path: Path) -> str:
    """Best-effort torch key for a param path (for error messages about missing keys)."""
    toks = []
    for i, seg in enumerate(path[:-1]):
        m = re.fullmatch(r"(down|up|block|attn)_(\d+)", seg)
        toks.append(f"{m.group(1)}.{m.group(2)}" if m and (i == 0 or path[i - 1] != "mid") else seg)
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return ".".join(toks + [leaf])


def kl_vae_key_map(shapes: Mapping[str, Sequence[int]], config=None) -> Dict[str, Tuple[Path, str]]:
    """Validate a torch state-dict's key -> shape table against the model: returns {torch key: (param path, transform)}
    with transform 'conv' (O,I,kh,kw -> kh,kw,I,O) or 'copy'. Needs shapes only, so full-size checks cost no memory."""
    return _plan(shapes, expected_shapes(kl_vae_module(config)))


def _plan(shapes: Mapping[str, Sequence[int]], want: Dict[Path, Tuple[int, ...]]) -> Dict[str, Tuple[Path, str]]:
    plan, unexpected, bad_shape, seen = {}, [], [], set()
    for key, shape in shapes.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        prefix, _, leaf = key.rpartition(".")
        shape = tuple(int(s) for s in shape)
        if leaf == "weight" and len(shape) == 4:
            jleaf, transform, out_shape = "kernel", "conv", (shape[2], shape[3], shape[1], shape[0])
        elif leaf == "weight" and len(shape) == 1:
            jleaf, transform, out_shape = "scale", "copy", shape
        elif leaf == "bias":
            jleaf, transform, out_shape = "bias", "copy", shape
        else:
            unexpected.append(f"{key} {shape}")
            continue
        path = _module_path(prefix) + (jleaf,)
        seen.add(path)
        if path not in want:
            unexpected.append(f"{key} {shape}")
        elif want[path] != out_shape:
            bad_shape.append(f"{key}: checkpoint {shape} -> {out_shape}, model expects {want[path]}")
        else:
            plan[key] = (path, transform)
    missing = [f"{_torch_name(p)} (params {'/'.join(p)} {want[p]})" for p in sorted(want) if p not in seen]
    problems = []
    for what, items in (("unexpected keys", unexpected), ("missing keys", missing), ("shape mismatches", bad_shape)):
        if items:
            problems.append(f"{len(items)} {what}: " + "; ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
    if problems:
        raise ValueError("KL-VAE checkpoint does not match the configured model (check config.model ch / ch_mult / "
                         "embed_dim / attn_resolutions): " + " | ".join(problems))
    return plan


def convert_kl_vae(sd: Mapping[str, np.ndarray], config=None) -> dict:
    """torch state dict (numpy arrays, keys as `AutoencoderKL.state_dict()`) -> nested params dict of float32 arrays.

    `config`: a run config (uses config.model and dtypes) or a model ConfigDict; None = the official KL-16 geometry.
    """
    want = expected_shapes(kl_vae_module(config))
    plan = _plan({k: np.shape(v) for k, v in sd.items()}, want)
    params: dict = {}
    for key, (path, transform) in plan.items():
        value = (conv2d({key: sd[key]}, key[: -len(".weight")], bias=False)["kernel"] if transform == "conv"
                 else np.asarray(sd[key], np.float32))
        node = params
        for seg in path[:-1]:
            node = node.setdefault(seg, {})
        node[path[-1]] = value
    check_tree_shapes(params, _nest(want), "converted KL-VAE params")
    return params


def _nest(want: Dict[Path, Tuple[int, ...]]) -> dict:
    ref: dict = {}
    for path, shape in want.items():
        node = ref
        for seg in path[:-1]:
            node = node.setdefault(seg, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, jnp.float32)
    return ref
