"""Original MaskGIT transformer checkpoints (google-research/maskgit `maskgit_imagenet{256,512}_checkpoint`, flax
msgpack of {'params': ...}) -> params of `jaxgen.families.nat.model.MaskGITTransformer`.

Official flax names (flattened with '.'): Embed_0.{word_embeddings, position_embeddings}.embedding,
Embed_0.embeddings_ln; TransformerLayer_i.Attention_0.self_attention.{query, key, value}.{kernel (D, H, hd),
bias (H, hd)} and .out.{kernel (H, hd, D), bias}, TransformerLayer_i.Attention_0.attention_output_ln,
TransformerLayer_i.Mlp_0.{intermediate_output, layer_output, layer_output_ln}; MlmLayer_0.{mlm_dense, mlm_ln,
mlm_bias.bias}. jaxgen fuses query / key / value into one qkv Dense ([q | k | v], head-major), as timm does.
The vocabulary is codebook + classes + mask (2025 for ImageNet), so num_classes = vocab - codebook - 1.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping

import numpy as np

from jaxgen import strict
from jaxgen.convert.torch_layout import check_tree_shapes, model_fields
from jaxgen.families.nat.model import MaskGITTransformer, abstract_params, backbone_from_fields

DEFAULT_CODEBOOK = 1024  # the MaskGIT VQGAN's


def _strip(sd: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Drop a leading 'params.' (the file holds the variables dict)."""
    return {k[len("params."):] if k.startswith("params.") else k: v for k, v in sd.items()}


def _layers(sd) -> int:
    found = {int(m.group(1)) for k in sd for m in [re.match(r"TransformerLayer_(\d+)\.", k)] if m}
    return max(found) + 1 if found else 0


def fields_from_checkpoint(sd: Mapping[str, Any], codebook_size: int = DEFAULT_CODEBOOK) -> Dict[str, Any]:
    shp = {k: tuple(np.shape(v)) for k, v in _strip(sd).items()}
    key = "Embed_0.word_embeddings.embedding"
    if key not in shp:
        raise ValueError(f"not a MaskGIT transformer checkpoint: missing {key!r}")
    vocab, d = shp[key]
    q = shp["TransformerLayer_0.Attention_0.self_attention.query.kernel"]
    return dict(hidden_size=int(d), depth=_layers(shp), num_heads=int(q[1]),
                mlp_dim=int(shp["TransformerLayer_0.Mlp_0.intermediate_output.kernel"][1]),
                codebook_size=int(codebook_size), num_classes=int(vocab - codebook_size - 1),
                image_seq_len=int(shp["Embed_0.position_embeddings.embedding"][0] - 1))


def _model_fields(config) -> Dict[str, Any]:
    return model_fields(config, drop=("backbone",))


def convert_maskgit(state_dict: Mapping[str, np.ndarray], config=None, check: bool = True) -> Dict[str, Any]:
    sd = _strip(state_dict)
    fields = strict.check_keys(MaskGITTransformer, _model_fields(config), "MaskGITTransformer fields")
    depth = _layers(sd)
    used = set()

    def get(key):
        if key not in sd:
            raise ValueError(f"MaskGIT checkpoint is missing {key!r}")
        used.add(key)
        return np.asarray(sd[key], np.float32)

    def norm(prefix):
        return {"scale": get(prefix + ".scale"), "bias": get(prefix + ".bias")}

    def dense(prefix):
        return {"kernel": get(prefix + ".kernel"), "bias": get(prefix + ".bias")}

    params: Dict[str, Any] = {"embeddings": {
        "word_embeddings": {"embedding": get("Embed_0.word_embeddings.embedding")},
        "position_embeddings": {"embedding": get("Embed_0.position_embeddings.embedding")},
        "LayerNorm": norm("Embed_0.embeddings_ln")}}
    for i in range(depth):
        p = f"TransformerLayer_{i}"
        att = f"{p}.Attention_0.self_attention"
        qkv = [get(f"{att}.{n}.kernel") for n in ("query", "key", "value")]
        d = qkv[0].shape[0]
        out = get(f"{att}.out.kernel")
        params[f"blocks_{i}"] = {
            "attn": {"qkv": {"kernel": np.concatenate([k.reshape(d, -1) for k in qkv], axis=1),
                             "bias": np.concatenate([get(f"{att}.{n}.bias").reshape(-1)
                                                     for n in ("query", "key", "value")])},
                     "proj": {"kernel": out.reshape(-1, out.shape[-1]), "bias": get(f"{att}.out.bias")}},
            "norm1": norm(f"{p}.Attention_0.attention_output_ln"),
            "mlp": {"fc1": dense(f"{p}.Mlp_0.intermediate_output"), "fc2": dense(f"{p}.Mlp_0.layer_output")},
            "norm2": norm(f"{p}.Mlp_0.layer_output_ln")}
    params["mlm_layer"] = {"fc": dense("MlmLayer_0.mlm_dense"), "ln": norm("MlmLayer_0.mlm_ln"),
                           "bias": get("MlmLayer_0.mlm_bias.bias").reshape(1, 1, -1)}
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise ValueError(f"unexpected MaskGIT checkpoint keys: {unexpected[:10]}")
    if check:
        arch = fields_from_checkpoint(sd, int(fields.get("codebook_size", DEFAULT_CODEBOOK)))
        arch.update(fields)
        check_tree_shapes(params, abstract_params(backbone_from_fields("maskgit", arch)), "MaskGIT checkpoint params")
    return params
