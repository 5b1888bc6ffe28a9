"""Official MaskGIT-VQGAN weights (`maskgit-vqgan-imagenet-f16-256.bin`, the state dict of bytedance/1d-tokenizer's
`PretrainedTokenizer`) -> jaxgen.tokenizers.maskgit_vqgan params, torch-free.

Keys map mechanically: a numeric list index is folded into the preceding name (`encoder.down.2.block.0.conv1` ->
encoder/down_2/block_0/conv1, `decoder.mid.1` -> decoder/mid_1), conv `weight` (O, I, kh, kw) -> `kernel`
(kh, kw, I, O), GroupNorm `weight` / `bias` -> `scale` / `bias`, and the codebook `quantize.embedding.weight` (V, C) ->
quantize/embedding as is. The expected key table is derived from the model's abstract params (jax.eval_shape of init),
so a missing key, an unexpected key or a shape mismatch raises ValueError naming the first offender.

Also: `fields_from_official` / `build_from_official` turn the official constructor arguments (the OmegaConf encoder /
decoder config plus the VectorQuantizer kwargs, as a parity fixture's JSON lists them) into the module.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.convert.torch_layout import check_tree_shapes, conv2d
from jaxgen.tokenizers.maskgit_vqgan import MaskGITVQGAN, maskgit_vqgan_from_config

Path = Tuple[str, ...]
ConfigLike = Union[None, MaskGITVQGAN, Mapping[str, Any]]

# official constructor name -> MaskGITVQGAN field (num_resolutions / embedding_dim are implied and only checked)
_OFFICIAL_FIELDS = {"channel_mult": "channel_mult", "dropout": "dropout", "hidden_channels": "hidden_channels",
                    "num_channels": "num_channels", "num_res_blocks": "num_res_blocks", "resolution": "resolution",
                    "z_channels": "z_channels", "num_embeddings": "codebook_size",
                    "commitment_cost": "commitment_cost"}
_IMPLIED = ("num_resolutions", "embedding_dim")
_LIST_MODULES = ("down", "up", "block", "mid")  # torch ModuleLists whose index is folded into the name


# ----------------------------------------------------------------------------- construction
def fields_from_official(kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """Official constructor arguments -> MaskGITVQGAN fields. Accepts the fixture layout
    {"encoder/decoder config": {...}, "quantize": {...}} or one flat mapping of official names; unknown names raise."""
    flat: Dict[str, Any] = {}
    for key, value in dict(kwargs).items():
        if isinstance(value, Mapping):  # a section (encoder/decoder config, quantize)
            for k, v in value.items():
                if k in flat and flat[k] != v:
                    raise ValueError(f"MaskGIT-VQGAN config: {k!r} given twice with different values")
                flat[k] = v
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(_OFFICIAL_FIELDS) - set(_IMPLIED))
    if unknown:
        raise ValueError(f"MaskGIT-VQGAN config: unknown official keys {unknown}; known: "
                         f"{sorted(set(_OFFICIAL_FIELDS) | set(_IMPLIED))}")
    fields = {_OFFICIAL_FIELDS[k]: (tuple(v) if isinstance(v, (list, tuple)) else v)
              for k, v in flat.items() if k in _OFFICIAL_FIELDS}
    defaults = MaskGITVQGAN()
    mult = fields.get("channel_mult", defaults.channel_mult)
    if "num_resolutions" in flat and int(flat["num_resolutions"]) != len(mult):
        raise ValueError(f"MaskGIT-VQGAN config: num_resolutions={flat['num_resolutions']} but channel_mult {mult} "
                         f"has {len(mult)} levels")
    z = fields.get("z_channels", defaults.z_channels)
    if "embedding_dim" in flat and int(flat["embedding_dim"]) != z:
        raise ValueError(f"MaskGIT-VQGAN config: codebook embedding_dim={flat['embedding_dim']} must equal "
                         f"z_channels={z} (the quantizer reads the encoder output directly)")
    return fields


def build_from_official(kwargs: Mapping[str, Any], dtype=None, param_dtype=None) -> MaskGITVQGAN:
    return maskgit_vqgan_from_config(fields_from_official(kwargs), dtype=dtype, param_dtype=param_dtype)


def _model(config: ConfigLike) -> MaskGITVQGAN:
    if config is None:
        return MaskGITVQGAN()
    if isinstance(config, MaskGITVQGAN):
        return config
    if hasattr(config, "get") and config.get("model") is not None:  # a run config: its model section
        config = config.get("model")
    return maskgit_vqgan_from_config(dict(config))


# ----------------------------------------------------------------------------- key table
def expected_shapes(model: MaskGITVQGAN) -> Dict[Path, Tuple[int, ...]]:
    """Param path -> shape, computed abstractly (no allocation); the smallest input the strides allow suffices."""
    size = model.downsample_factor
    x = jnp.zeros((1, size, size, model.num_channels), jnp.float32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))["params"]
    params = nn.meta.unbox(boxed)
    return {tuple(k.key for k in path): tuple(v.shape) for path, v in jax.tree_util.tree_leaves_with_path(params)}


def torch_key(path: Path) -> Tuple[str, str]:
    """Param path -> (torch state-dict key, transform 'conv' | 'copy')."""
    toks = []
    for seg in path[:-1]:
        m = re.fullmatch(rf"({'|'.join(_LIST_MODULES)})_(\d+)", seg)
        toks.append(f"{m.group(1)}.{m.group(2)}" if m else seg)
    leaf = path[-1]
    if leaf == "embedding":  # the codebook param IS torch's nn.Embedding module `quantize.embedding`
        return ".".join(toks + ["embedding", "weight"]), "copy"
    if leaf == "kernel":
        return ".".join(toks + ["weight"]), "conv"
    return ".".join(toks + [{"scale": "weight"}.get(leaf, leaf)]), "copy"


def _torch_shape(shape: Tuple[int, ...], transform: str) -> Tuple[int, ...]:
    return (shape[3], shape[2], shape[0], shape[1]) if transform == "conv" else shape


def maskgit_vqgan_key_map(shapes: Mapping[str, Sequence[int]], config: ConfigLike = None
                          ) -> Dict[str, Tuple[Path, str]]:
    """Validate a state dict's key -> shape table against the model: {torch key: (param path, transform)}.
    Needs shapes only, so full-size checks cost no memory. Raises ValueError naming the first missing key (in the
    model's order), then unexpected keys and shape mismatches."""
    return _plan(shapes, expected_shapes(_model(config)))


def _plan(shapes: Mapping[str, Sequence[int]], want: Dict[Path, Tuple[int, ...]]) -> Dict[str, Tuple[Path, str]]:
    table = {}
    for path, shape in want.items():
        key, transform = torch_key(path)
        table[key] = (path, transform, _torch_shape(shape, transform))
    got = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
    missing = [k for k in table if k not in got]
    unexpected = [k for k in got if k not in table]
    bad = [f"{k}: checkpoint {got[k]}, model expects {table[k][2]}" for k in table if k in got and got[k] != table[k][2]]
    problems = []
    if missing:
        problems.append(f"missing key {missing[0]!r} (shape {table[missing[0]][2]})"
                        + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: " + ", ".join(unexpected[:5])
                        + (" ..." if len(unexpected) > 5 else ""))
    if bad:
        problems.append(f"{len(bad)} shape mismatches: " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    if problems:
        raise ValueError("MaskGIT-VQGAN state dict does not match the configured model (check hidden_channels / "
                         "channel_mult / num_res_blocks / z_channels / codebook_size): " + " | ".join(problems))
    return {k: (path, transform) for k, (path, transform, _) in table.items()}


# ----------------------------------------------------------------------------- conversion
def convert_maskgit_vqgan(state_dict: Mapping[str, np.ndarray], config: ConfigLike = None) -> dict:
    """Flat torch-style state dict (numpy arrays, keys as `PretrainedTokenizer.state_dict()`) -> nested params dict of
    float32 numpy arrays for MaskGITVQGAN. `config`: None (the official f16-256 tokenizer), a mapping of MaskGITVQGAN
    fields, or the module itself."""
    want = expected_shapes(_model(config))
    plan = _plan({k: np.shape(v) for k, v in state_dict.items()}, want)
    params: dict = {}
    for key, (path, transform) in plan.items():
        value = (conv2d(state_dict, key[: -len(".weight")], bias=False)["kernel"] if transform == "conv"
                 else np.asarray(state_dict[key], np.float32))
        node = params
        for seg in path[:-1]:
            node = node.setdefault(seg, {})
        node[path[-1]] = value
    reference: dict = {}
    for path, shape in want.items():
        node = reference
        for seg in path[:-1]:
            node = node.setdefault(seg, {})
        node[path[-1]] = jax.ShapeDtypeStruct(shape, jnp.float32)
    check_tree_shapes(params, reference, "converted MaskGIT-VQGAN params")
    return params


# ----------------------------------------------------------------------------- MAGE's VQGAN (AutoNAT's tokenizer)
# MAGE's `vqgan_jax_strongaug.ckpt` (used by AutoNAT) is the MaskGIT VQGAN in taming-transformers names: the two mid
# blocks are mid.block_1 / mid.block_2 and the decoder's upsampling conv is up.i.upsample.conv.
_MAGE_RENAMES = ((re.compile(r"\.mid\.block_1\."), ".mid.0."), (re.compile(r"\.mid\.block_2\."), ".mid.1."),
                 (re.compile(r"\.upsample\.conv\."), ".upsample_conv."))


def mage_to_maskgit_keys(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _MAGE_RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def convert_mage_vqgan(state_dict: Mapping[str, np.ndarray], config: ConfigLike = None) -> dict:
    """MAGE / AutoNAT VQGAN state dict (taming names) -> MaskGITVQGAN params (see `convert_maskgit_vqgan`)."""
    return convert_maskgit_vqgan(mage_to_maskgit_keys(state_dict), config)
