"""Official RAR checkpoints (bytedance/1d-tokenizer `rar_{b,l,xl,xxl}.bin`, `RAR.state_dict()`) -> jaxgen params.

Keys: cls_token, pos_embed, target_aware_pos_embed, timesteps_embeddings, embeddings.weight,
blocks.i.{norm1, attn.qkv, attn.q_norm, attn.k_norm, attn.proj, norm2, mlp.fc1, mlp.fc2, adaLN_modulation.1},
adaln_before_head.adaLN_modulation.1, lm_head. `attn_mask` (the non-persistent causal mask) is skipped when present.
Input: {key: np.ndarray} (no torch needed). The architecture is read from the shapes (heads from q_norm's head_dim)
unless a config gives it; the result is checked against the module's abstract params.
`views=True` keeps transposed numpy VIEWS (no copies): with `np.broadcast_to` inputs a full-size manifest maps onto
the model without allocating (manifest tests).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping

import numpy as np

from jaxgen.convert.torch_layout import check_tree_shapes, model_fields
from jaxgen import strict
from jaxgen.families.rar.model import (POS_EXTRA_ROWS, RAR, RAR_SIZES, TIMESTEP_EXTRA_ROWS, abstract_params,
                                       rar_fields, rar_from_fields)

__all__ = ["RAR_SIZES", "RAR_IGNORED", "convert_rar", "expected_rar_keys", "rar_fields_from_state_dict",
           "rar_from_fields", "rar_fields"]

StateDict = Mapping[str, np.ndarray]
RAR_IGNORED = ("attn_mask",)
_FREE = ("cls_token", "pos_embed", "target_aware_pos_embed", "timesteps_embeddings")
# torch submodule -> (jaxgen path, kind); kind: linear (weight -> kernel), norm (weight -> scale)
_BLOCK_PARTS = (("norm1", ("norm1",), "norm"), ("attn.qkv", ("attn", "qkv"), "linear"),
                ("attn.q_norm", ("attn", "q_norm"), "norm"), ("attn.k_norm", ("attn", "k_norm"), "norm"),
                ("attn.proj", ("attn", "proj"), "linear"), ("norm2", ("norm2",), "norm"),
                ("mlp.fc1", ("mlp", "fc1"), "linear"), ("mlp.fc2", ("mlp", "fc2"), "linear"),
                ("adaLN_modulation.1", ("adaLN_modulation",), "linear"))
_HEAD_PARTS = (("adaln_before_head.adaLN_modulation.1", ("adaln_before_head", "adaLN_modulation"), "linear"),
               ("lm_head", ("lm_head",), "linear"))


def _parts(depth: int):
    for i in range(depth):
        for torch_name, path, kind in _BLOCK_PARTS:
            yield f"blocks.{i}.{torch_name}", (f"blocks_{i}",) + path, kind
    yield from _HEAD_PARTS


def expected_rar_keys(depth: int) -> List[str]:
    """Every persistent state_dict key of an official RAR with `depth` blocks, in state_dict order."""
    keys = list(_FREE)
    for i in range(depth):
        keys += [f"blocks.{i}.{name}.{wb}" for name, _, _ in _BLOCK_PARTS for wb in ("weight", "bias")]
    keys.append("embeddings.weight")
    keys += [f"{name}.{wb}" for name, _, _ in _HEAD_PARTS for wb in ("weight", "bias")]
    return keys


def _shape(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else tuple(np.shape(v))


def rar_fields_from_state_dict(shapes: Mapping[str, Any]) -> Dict[str, int]:
    """Architecture fields (hidden_size, depth, num_heads, mlp_dim, codebook_size, num_classes, image_seq_len) read
    from a state_dict's shapes (values may be arrays or shape tuples)."""
    shp = {k: _shape(v) for k, v in shapes.items()}
    need = ("cls_token", "timesteps_embeddings", "pos_embed", "embeddings.weight", "lm_head.weight",
            "blocks.0.attn.q_norm.weight", "blocks.0.mlp.fc1.weight")
    for key in need:
        if key not in shp:
            raise ValueError(f"not a RAR state_dict: missing {key!r}")
    d = shp["cls_token"][-1]
    codebook = shp["lm_head.weight"][0]
    head_dim = shp["blocks.0.attn.q_norm.weight"][0]
    seq = shp["timesteps_embeddings"][1] - TIMESTEP_EXTRA_ROWS
    if shp["pos_embed"][1] - POS_EXTRA_ROWS != seq:
        raise ValueError(f"RAR state_dict: pos_embed has {shp['pos_embed'][1]} rows and timesteps_embeddings "
                         f"{shp['timesteps_embeddings'][1]}; expected image_seq_len + {POS_EXTRA_ROWS} and "
                         f"image_seq_len + {TIMESTEP_EXTRA_ROWS}")
    if d % head_dim:
        raise ValueError(f"RAR state_dict: width {d} is not a multiple of the q_norm head_dim {head_dim}")
    blocks = {int(m.group(1)) for k in shp for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    return dict(hidden_size=int(d), depth=max(blocks) + 1, num_heads=int(d // head_dim),
                mlp_dim=int(shp["blocks.0.mlp.fc1.weight"][0]), codebook_size=int(codebook),
                num_classes=int(shp["embeddings.weight"][0] - codebook - 2), image_seq_len=int(seq))


def _model_fields(config) -> Dict[str, Any]:
    return model_fields(config)


def _set(tree: Dict[str, Any], path, value) -> None:
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value


def convert_rar(state_dict: StateDict, config=None, views: bool = False, check: bool = True) -> Dict[str, Any]:
    """Official RAR state_dict -> params of `jaxgen.families.rar.model.RAR`.

    config: RAR fields (a mapping, or a run config's `model`); fields it leaves out are read from the checkpoint.
    Raises ValueError naming the first missing key, any unexpected key, and (check) every shape that differs from
    the module built from the config.
    """
    sd = {k: v for k, v in state_dict.items() if k not in RAR_IGNORED}
    fields = strict.check_keys(RAR, _model_fields(config), "RAR fields")
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    depth = int(fields.get("depth", (max(blocks) + 1) if blocks else 0))
    expected = expected_rar_keys(depth)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"RAR state_dict is missing {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + f"; expected the {len(expected)} keys of a {depth}-block RAR")
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected RAR state_dict keys for a {depth}-block RAR: {unexpected[:10]}"
                         + (" ..." if len(unexpected) > 10 else ""))

    def f32(key):
        return np.asarray(sd[key], np.float32)

    def kernel(key):
        k = f32(key).T  # torch Linear (out, in) -> (in, out)
        return k if views else np.ascontiguousarray(k)

    params: Dict[str, Any] = {name: f32(name) for name in _FREE}
    params["embeddings"] = {"embedding": f32("embeddings.weight")}
    for prefix, path, kind in _parts(depth):
        first = kernel(prefix + ".weight") if kind == "linear" else f32(prefix + ".weight")
        _set(params, path + ("kernel" if kind == "linear" else "scale",), first)
        _set(params, path + ("bias",), f32(prefix + ".bias"))

    if check:
        arch = rar_fields_from_state_dict({k: np.shape(v) for k, v in sd.items()})
        arch.update(fields)
        check_tree_shapes(params, abstract_params(rar_from_fields(arch)), "RAR checkpoint params")
    return params


def build_rar(state_dict_or_shapes: Mapping[str, Any], config=None) -> RAR:
    """The RAR a checkpoint describes, with `config` fields (dropout, dtype, ...) on top."""
    arch = rar_fields_from_state_dict(state_dict_or_shapes)
    arch.update(_model_fields(config))
    return rar_from_fields(arch)
