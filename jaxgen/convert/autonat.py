"""AutoNAT U-ViT checkpoints (LeapLabTHU/ImprovedNAT `nnet_ema.pth`, `UViT.state_dict()`) -> jaxgen params of
`jaxgen.families.nat.model.UViT`.

Keys: token_emb.{word_embeddings, position_embeddings, LayerNorm}, context_embed.{same}, in_blocks.i / mid_block /
out_blocks.i .{norm1, attn.qkv (no bias), attn.proj, norm2, mlp.fc1, mlp.fc2} (+ out_blocks.i.skip_linear), norm,
mlm_layer.{fc, ln, bias}. Official `num_classes` counts the null class (1001); jaxgen's does not (1000).
The architecture is read from the shapes except num_heads (not in any shape: 8 for AutoNAT-L unless the config
says otherwise). Input: {key: np.ndarray}, no torch needed.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping

import numpy as np

from jaxgen import strict
from jaxgen.convert.torch_layout import check_tree_shapes, model_fields
from jaxgen.families.nat.model import UViT, abstract_params, backbone_from_fields

StateDict = Mapping[str, np.ndarray]
_EMB = ("word_embeddings", "position_embeddings")
_BLOCK = (("norm1", ("norm1",), "norm"), ("attn.qkv", ("attn", "qkv"), "linear_nobias"),
          ("attn.proj", ("attn", "proj"), "linear"), ("norm2", ("norm2",), "norm"),
          ("mlp.fc1", ("mlp", "fc1"), "linear"), ("mlp.fc2", ("mlp", "fc2"), "linear"))
DEFAULT_NUM_HEADS = 8  # AutoNAT-L


def _blocks(sd, prefix: str) -> int:
    found = {int(m.group(1)) for k in sd for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m}
    return max(found) + 1 if found else 0


def expected_keys(half_depth: int) -> List[str]:
    keys = [f"{e}.{t}.weight" for e in ("token_emb", "context_embed") for t in _EMB]
    keys += [f"{e}.LayerNorm.{wb}" for e in ("token_emb", "context_embed") for wb in ("weight", "bias")]
    prefixes = [f"in_blocks.{i}" for i in range(half_depth)] + ["mid_block"] + \
        [f"out_blocks.{i}" for i in range(half_depth)]
    for p in prefixes:
        for name, _, kind in _BLOCK:
            keys.append(f"{p}.{name}.weight")
            if kind != "linear_nobias":
                keys.append(f"{p}.{name}.bias")
        if p.startswith("out_blocks"):
            keys += [f"{p}.skip_linear.weight", f"{p}.skip_linear.bias"]
    keys += ["norm.weight", "norm.bias", "mlm_layer.bias", "mlm_layer.fc.weight", "mlm_layer.fc.bias",
             "mlm_layer.ln.weight", "mlm_layer.ln.bias"]
    return keys


def fields_from_state_dict(shapes: Mapping[str, Any]) -> Dict[str, Any]:
    """UViT fields (embed_dim, depth, mlp_ratio, codebook_size, num_classes, image_seq_len) from the shapes."""
    shp = {k: tuple(v) if isinstance(v, (tuple, list)) else tuple(np.shape(v)) for k, v in shapes.items()}
    for key in ("token_emb.word_embeddings.weight", "context_embed.word_embeddings.weight",
                "token_emb.position_embeddings.weight", "mid_block.mlp.fc1.weight"):
        if key not in shp:
            raise ValueError(f"not an AutoNAT U-ViT state_dict: missing {key!r}")
    vocab, d = shp["token_emb.word_embeddings.weight"]
    return dict(embed_dim=int(d), depth=2 * _blocks(shp, "in_blocks"),
                mlp_ratio=shp["mid_block.mlp.fc1.weight"][0] / d, codebook_size=int(vocab - 1),
                num_classes=int(shp["context_embed.word_embeddings.weight"][0] - 1),
                image_seq_len=int(shp["token_emb.position_embeddings.weight"][0]))


def _model_fields(config) -> Dict[str, Any]:
    return model_fields(config, drop=("backbone",))


def build_uvit(state_dict_or_shapes: Mapping[str, Any], config=None) -> UViT:
    fields = {"num_heads": DEFAULT_NUM_HEADS, **fields_from_state_dict(state_dict_or_shapes)}
    fields.update(_model_fields(config))
    return backbone_from_fields("uvit", fields)


def convert_autonat(state_dict: StateDict, config=None, check: bool = True) -> Dict[str, Any]:
    """Official U-ViT state_dict -> params. Raises ValueError on a missing / unexpected key or (check) a shape that
    differs from the module the config (or, where it is silent, the checkpoint) describes."""
    sd = dict(state_dict)
    fields = strict.check_keys(UViT, _model_fields(config), "UViT fields")
    half = _blocks(sd, "in_blocks")
    if fields.get("depth") is not None and int(fields["depth"]) != 2 * half:
        raise ValueError(f"config depth {fields['depth']} but the checkpoint has {half} in_blocks (depth {2 * half})")
    expected = expected_keys(half)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"U-ViT state_dict is missing {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected U-ViT state_dict keys: {unexpected[:10]}")

    def f32(key):
        return np.asarray(sd[key], np.float32)

    params: Dict[str, Any] = {}
    for e in ("token_emb", "context_embed"):
        params[e] = {t: {"embedding": f32(f"{e}.{t}.weight")} for t in _EMB}
        params[e]["LayerNorm"] = {"scale": f32(f"{e}.LayerNorm.weight"), "bias": f32(f"{e}.LayerNorm.bias")}

    def block(prefix):
        out: Dict[str, Any] = {}
        for name, path, kind in _BLOCK:
            node = out
            for p in path[:-1]:
                node = node.setdefault(p, {})
            if kind == "norm":
                node[path[-1]] = {"scale": f32(f"{prefix}.{name}.weight"), "bias": f32(f"{prefix}.{name}.bias")}
            else:
                node[path[-1]] = {"kernel": np.ascontiguousarray(f32(f"{prefix}.{name}.weight").T)}
                if kind == "linear":
                    node[path[-1]]["bias"] = f32(f"{prefix}.{name}.bias")
        return out

    for i in range(half):
        params[f"in_blocks_{i}"] = block(f"in_blocks.{i}")
        params[f"out_blocks_{i}"] = block(f"out_blocks.{i}")
        params[f"skip_linears_{i}"] = {"kernel": np.ascontiguousarray(f32(f"out_blocks.{i}.skip_linear.weight").T),
                                       "bias": f32(f"out_blocks.{i}.skip_linear.bias")}
    params["mid_block"] = block("mid_block")
    params["norm"] = {"scale": f32("norm.weight"), "bias": f32("norm.bias")}
    params["mlm_layer"] = {"fc": {"kernel": np.ascontiguousarray(f32("mlm_layer.fc.weight").T),
                                  "bias": f32("mlm_layer.fc.bias")},
                           "ln": {"scale": f32("mlm_layer.ln.weight"), "bias": f32("mlm_layer.ln.bias")},
                           "bias": f32("mlm_layer.bias")}
    if check:
        check_tree_shapes(params, abstract_params(build_uvit({k: np.shape(v) for k, v in sd.items()}, fields)),
                          "AutoNAT checkpoint params")
    return params
