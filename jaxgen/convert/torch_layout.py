"""Torch -> jaxgen tensor layout helpers shared by every family's key map."""
from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

StateDict = Mapping[str, np.ndarray]


def model_fields(config, drop=()) -> Dict[str, Any]:
    """The model fields a converter is given: config.model of a run config (ConfigDict or dict), or a plain mapping
    of fields; keys in `drop` (selectors such as NAT's `backbone`) removed. None -> {}."""
    if config is None:
        return {}
    model = config.get("model") if hasattr(config, "get") else getattr(config, "model", None)
    src = model if model is not None else config
    fields = dict(src.to_dict() if hasattr(src, "to_dict") else src)
    for key in drop:
        fields.pop(key, None)
    return fields


def linear(sd: StateDict, prefix: str, bias: bool = True) -> Dict[str, np.ndarray]:
    """torch Linear weight (out, in) -> {'kernel': (in, out), 'bias': (out,)}."""
    out = {"kernel": np.ascontiguousarray(np.asarray(sd[prefix + ".weight"], np.float32).T)}
    if bias:
        out["bias"] = np.asarray(sd[prefix + ".bias"], np.float32)
    return out


def conv2d(sd: StateDict, prefix: str, bias: bool = True) -> Dict[str, np.ndarray]:
    """torch Conv2d weight (O, I, kh, kw) -> {'kernel': (kh, kw, I, O), 'bias': (O,)}."""
    w = np.asarray(sd[prefix + ".weight"], np.float32)
    out = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0))}
    if bias:
        out["bias"] = np.asarray(sd[prefix + ".bias"], np.float32)
    return out


def norm(sd: StateDict, prefix: str) -> Dict[str, np.ndarray]:
    """torch LayerNorm / GroupNorm (weight, bias) -> {'scale', 'bias'}."""
    return {"scale": np.asarray(sd[prefix + ".weight"], np.float32),
            "bias": np.asarray(sd[prefix + ".bias"], np.float32)}


def embedding(sd: StateDict, prefix: str) -> Dict[str, np.ndarray]:
    return {"embedding": np.asarray(sd[prefix + ".weight"], np.float32)}


def check_tree_shapes(converted: Any, reference: Any, what: str = "params") -> None:
    """Raise ValueError naming every path whose presence or shape differs between two pytrees of arrays.

    `reference` is typically `jax.eval_shape(module.init, ...)['params']` (unboxed).
    """
    import jax

    conv = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(converted)}
    ref = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(reference)}
    problems = []
    for k in sorted(set(ref) - set(conv)):
        problems.append(f"missing {k} {ref[k]}")
    for k in sorted(set(conv) - set(ref)):
        problems.append(f"unexpected {k} {conv[k]}")
    for k in sorted(set(conv) & set(ref)):
        if tuple(conv[k]) != tuple(ref[k]):
            problems.append(f"shape {k}: converted {tuple(conv[k])} vs model {ref[k]}")
    if problems:
        raise ValueError(f"{what} do not match the model: " + "; ".join(problems[:20])
                         + (f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""))


def unused_keys(sd: StateDict, used_prefixes) -> list:
    return [k for k in sd if not any(k == p or k.startswith(p + ".") for p in used_prefixes)]
