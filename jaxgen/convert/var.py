"""Official VAR checkpoints -> jaxgen params: `vae_ch160v4096z32.pth` (VQVAE) and `var_d{16..36}.pth` (transformer).

Both converters read a torch state_dict given as {key: np.ndarray}, map every key onto the jaxgen param tree, and raise
ValueError naming each missing, unexpected or mis-shaped entry. Buffers that are constants or training statistics are
skipped on purpose:
  VQVAE: quantize.ema_vocab_hit_SV (code-usage EMA of VQ training; unused at inference)
  VAR:   attn_bias_for_masking (block-causal mask, rebuilt from patch_nums), lvl_1L (level ids, rebuilt),
         blocks.*.attn.zero_k_bias (constant zeros: k has no bias)
`views=True` returns transposed numpy VIEWS instead of contiguous copies: with `np.broadcast_to` inputs this maps a
full-size manifest onto the model without allocating (used by the manifest tests).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from jaxgen.convert.torch_layout import check_tree_shapes, model_fields

StateDict = Mapping[str, np.ndarray]

VQVAE_IGNORED = ("quantize.ema_vocab_hit_SV",)
VAR_IGNORED_RE = re.compile(r"^(attn_bias_for_masking|lvl_1L|blocks\.\d+\.attn\.zero_k_bias)$")


# ----------------------------------------------------------------------------- helpers
def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def _linear_kernel(w, views: bool) -> np.ndarray:
    k = _f32(w).T  # torch (out, in) -> (in, out)
    return k if views else np.ascontiguousarray(k)


def _conv_kernel(w, views: bool) -> np.ndarray:
    k = _f32(w).transpose(2, 3, 1, 0)  # torch (O, I, kh, kw) -> (kh, kw, I, O)
    return k if views else np.ascontiguousarray(k)


def _set(tree: Dict[str, Any], path: Tuple[str, ...], value) -> None:
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
    if path[-1] in node:
        raise ValueError(f"two checkpoint keys map onto the same param {'/'.join(path)}")
    node[path[-1]] = value


def _shape_tree(params) -> Any:
    import flax.linen as nn
    return nn.unbox(params)


# ----------------------------------------------------------------------------- VQVAE
def vqvae_arch_from_state_dict(shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, Any]:
    """Architecture fields of a VQVAE state_dict read from its key shapes (v_patch_nums cannot be inferred)."""
    shp = {k: tuple(np.shape(v)) if not isinstance(v, (tuple, list)) else tuple(v) for k, v in shapes.items()}
    try:
        vocab, z = shp["quantize.embedding.weight"]
        ch, in_ch = shp["encoder.conv_in.weight"][:2]
    except KeyError as e:
        raise ValueError(f"not a VAR VQVAE state_dict: missing {e}") from None
    levels = sorted({int(m.group(1)) for k in shp for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m})
    ch_mult = tuple(shp[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in levels)
    blocks = {int(m.group(1)) for k in shp for m in [re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)] if m}
    arch = dict(vocab_size=int(vocab), z_channels=int(z), ch=int(ch), in_channels=int(in_ch), ch_mult=ch_mult,
                num_res_blocks=len(blocks),
                using_sa=any(re.match(r"encoder\.down\.\d+\.attn\.", k) for k in shp),
                using_mid_sa="encoder.mid.attn_1.qkv.weight" in shp,
                quant_conv_ks=int(shp["quant_conv.weight"][-1]))
    partial = {int(m.group(1)) for k in shp for m in [re.match(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.", k)] if m}
    nonshared = {int(m.group(1)) for k in shp for m in [re.match(r"quantize\.quant_resi\.(\d+)\.", k)] if m}
    if partial:
        arch["share_quant_resi"] = len(partial)
    elif "quantize.quant_resi.qresi.weight" in shp:
        arch["share_quant_resi"] = 1
    elif nonshared:
        arch.update(share_quant_resi=0, default_qresi_counts=len(nonshared))
    else:
        arch["quant_resi"] = 0.0
    return arch


def _vqvae_path(key: str, ndim: int) -> Tuple[str, ...]:
    if key == "quantize.embedding.weight":
        return ("codebook",)
    m = (re.fullmatch(r"quantize\.quant_resi\.qresi_ls\.(\d+)\.(weight|bias)", key)
         or re.fullmatch(r"quantize\.quant_resi\.(\d+)\.(weight|bias)", key))
    if m:
        return (f"qresi_{m.group(1)}", "kernel" if m.group(2) == "weight" else "bias")
    m = re.fullmatch(r"quantize\.quant_resi\.qresi\.(weight|bias)", key)
    if m:
        return ("qresi_0", "kernel" if m.group(1) == "weight" else "bias")
    m = re.fullmatch(r"(encoder|decoder|quant_conv|post_quant_conv)(\..+)?\.(weight|bias)", key)
    if not m:
        raise ValueError(f"unexpected VQVAE checkpoint key {key!r}")
    inner = (m.group(2) or "")[1:]
    inner = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", inner)  # list indices fold into the name: down.1.block.0 -> down_1.block_0
    leaf = "bias" if m.group(3) == "bias" else ("kernel" if ndim == 4 else "scale")
    return (m.group(1),) + (tuple(inner.split(".")) if inner else ()) + (leaf,)


def convert_vqvae(sd: StateDict, config: Optional[Mapping[str, Any]] = None, views: bool = False,
                  check: bool = True) -> Dict[str, Any]:
    """VAR VQVAE state_dict -> params of `jaxgen.tokenizers.msvq.VQVAE`.

    config: VQVAE fields (e.g. config.model of an msvq config); missing architecture fields are read from the
    checkpoint's shapes. With check=True the result is compared against the model's abstract params.
    """
    params: Dict[str, Any] = {}
    for key, w in sd.items():
        if key in VQVAE_IGNORED:
            continue
        path = _vqvae_path(key, np.ndim(w))
        if path[-1] == "kernel":
            value = _conv_kernel(w, views)
        else:
            value = _f32(w)
        _set(params, path, value)
    if check:
        check_tree_shapes(params, vqvae_abstract_params(sd, config), "VQVAE checkpoint params")
    return params


def vqvae_abstract_params(sd_or_shapes: Mapping[str, Any], config: Optional[Mapping[str, Any]] = None):
    import jax
    import jax.numpy as jnp
    from jaxgen import strict
    from jaxgen.tokenizers.msvq import VQVAE

    arch = vqvae_arch_from_state_dict({k: np.shape(v) for k, v in sd_or_shapes.items()})
    cfg = dict(arch)
    cfg.update(_model_fields(config))
    model = strict.build(VQVAE, cfg, "VQVAE fields")
    size = model.v_patch_nums[-1] * 2 ** (len(model.ch_mult) - 1)
    x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype), train=False))
    return _shape_tree(shapes["params"])


# ----------------------------------------------------------------------------- VAR transformer
def _model_fields(config) -> Dict[str, Any]:
    return model_fields(config)


def var_arch_from_state_dict(shapes: Mapping[str, Any]) -> Dict[str, Any]:
    """VAR architecture read from a state_dict's keys / shapes. attn_l2_norm follows the presence of scale_mul_1H11
    (older uploads were trained without l2-normalised attention); shared_aln the presence of shared_ada_lin."""
    shp = {k: tuple(np.shape(v)) if not isinstance(v, (tuple, list)) else tuple(v) for k, v in shapes.items()}
    try:
        c, cvae = shp["word_embed.weight"]
        vocab = shp["head.weight"][0]
        n_cls = shp["class_emb.weight"][0] - 1
        n_lvl = shp["lvl_embed.weight"][0]
        seq_len = shp["pos_1LC"][1]
    except KeyError as e:
        raise ValueError(f"not a VAR state_dict: missing {e}") from None
    depth = len({int(m.group(1)) for k in shp for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    arch = dict(depth=depth, embed_dim=int(c), cvae=int(cvae), vocab_size=int(vocab), num_classes=int(n_cls),
                num_levels=int(n_lvl), seq_len=int(seq_len),
                attn_l2_norm="blocks.0.attn.scale_mul_1H11" in shp,
                shared_aln="shared_ada_lin.1.weight" in shp)
    if arch["attn_l2_norm"]:
        arch["num_heads"] = int(shp["blocks.0.attn.scale_mul_1H11"][1])
    return arch


def _var_path(key: str) -> Tuple[Tuple[str, ...], str]:
    """torch key -> (jaxgen path, transform) with transform in {'copy', 'linear', 'heads'}."""
    simple = {"pos_start": ("pos_start",), "pos_1LC": ("pos_1LC",),
              "class_emb.weight": ("class_emb", "embedding"), "lvl_embed.weight": ("lvl_embed", "embedding")}
    if key in simple:
        return simple[key], "copy"
    m = re.fullmatch(r"(word_embed|head|shared_ada_lin\.1|head_nm\.ada_lin\.1)\.(weight|bias)", key)
    if m:
        mod = {"word_embed": ("word_embed",), "head": ("head",), "shared_ada_lin.1": ("shared_ada_lin",),
               "head_nm.ada_lin.1": ("head_nm", "ada_lin")}[m.group(1)]
        return (mod + ("kernel",), "linear") if m.group(2) == "weight" else (mod + ("bias",), "copy")
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if not m:
        raise ValueError(f"unexpected VAR checkpoint key {key!r}")
    blk, rest = (f"blocks_{m.group(1)}",), m.group(2)
    leaf = {"attn.scale_mul_1H11": (("attn", "scale_mul"), "heads"),
            "attn.q_bias": (("attn", "q_bias"), "copy"), "attn.v_bias": (("attn", "v_bias"), "copy"),
            "attn.mat_qkv.weight": (("attn", "qkv", "kernel"), "linear"),
            "ada_gss": (("ada_gss",), "copy")}
    if rest in leaf:
        return blk + leaf[rest][0], leaf[rest][1]
    m = re.fullmatch(r"(attn\.proj|ffn\.fc1|ffn\.fc2|ada_lin\.1)\.(weight|bias)", rest)
    if not m:
        raise ValueError(f"unexpected VAR checkpoint key {key!r}")
    mod = {"attn.proj": ("attn", "proj"), "ffn.fc1": ("ffn", "fc1"), "ffn.fc2": ("ffn", "fc2"),
           "ada_lin.1": ("ada_lin",)}[m.group(1)]
    return (blk + mod + ("kernel",), "linear") if m.group(2) == "weight" else (blk + mod + ("bias",), "copy")


def convert_var(sd: StateDict, config=None, views: bool = False, check: bool = True) -> Dict[str, Any]:
    """VAR state_dict -> params of `jaxgen.families.var.model.VAR`.

    config: a run config (its `model` is used) or a mapping of model fields; fields it does not give (depth, width,
    attn_l2_norm, shared_aln, ...) are read from the checkpoint. A config that contradicts the checkpoint (e.g.
    attn_l2_norm=True for an upload without scale_mul_1H11) raises ValueError saying which field to change.
    """
    params: Dict[str, Any] = {}
    for key, w in sd.items():
        if VAR_IGNORED_RE.match(key):
            continue
        path, how = _var_path(key)
        if how == "linear":
            value = _linear_kernel(w, views)
        elif how == "heads":
            value = _f32(w).reshape(-1)  # (1, H, 1, 1) -> (H,)
        else:
            value = _f32(w)
        _set(params, path, value)
    if check:
        arch = var_arch_from_state_dict({k: np.shape(v) for k, v in sd.items()})
        fields = _model_fields(config)
        for name in ("attn_l2_norm", "shared_aln"):
            if name in fields and bool(fields[name]) != arch[name]:
                raise ValueError(f"the checkpoint has {name}={arch[name]} but the config says {fields[name]}: set "
                                 f"config.model.{name}={arch[name]}"
                                 + (" (configs/var_d*.py:no_l2norm)" if name == "attn_l2_norm" else ""))
        check_tree_shapes(params, var_abstract_params(arch, fields), "VAR checkpoint params")
    return params


def var_abstract_params(arch: Mapping[str, Any], fields: Optional[Mapping[str, Any]] = None):
    """Abstract (shape-only) params of the VAR described by `fields` (config.model), completed from `arch`."""
    import jax
    import jax.numpy as jnp
    from jaxgen.families.var.model import var_from_config

    m = {k: v for k, v in arch.items() if k in ("depth", "embed_dim", "num_heads", "num_classes", "attn_l2_norm",
                                                 "shared_aln")}
    m.update(dict(fields or {}))
    model = var_from_config(m, vocab_size=int(arch["vocab_size"]), cvae=int(arch["cvae"]))
    b = 1
    labels = jnp.zeros((b,), jnp.int32)
    x = jnp.zeros((b, model.seq_len - model.first_l, model.cvae), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), labels, x))
    return _shape_tree(shapes["params"])
