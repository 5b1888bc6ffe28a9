"""Params-only checkpoints: what converters write, what a trained tokenizer exports, what samplers and
fine-tuning runs load. Layout: DIR/params (orbax PyTree of {'params', optional 'ema_params'}) + DIR/jaxgen.json."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxgen.errors import CheckpointError

META = "jaxgen.json"


def save_params(directory: str, params: Any, ema_params: Any = None, meta: Optional[dict] = None) -> str:
    directory = os.path.abspath(directory)
    tree = {"params": params}
    if ema_params is not None:
        tree["ema_params"] = ema_params
    path = os.path.join(directory, "params")
    ckptr = ocp.StandardCheckpointer()
    # Orbax writes to a temporary name and renames on success: a cut-off export never looks complete.
    ckptr.save(path, tree, force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(directory, META), "w") as f:
            json.dump(meta or {}, f, indent=2, sort_keys=True)
    return directory


def is_params_dir(directory: str) -> bool:
    return os.path.isdir(os.path.join(directory, "params")) and os.path.exists(os.path.join(directory, META))


def load_meta(directory: str) -> dict:
    with open(os.path.join(directory, META)) as f:
        return json.load(f)


def load_params(directory: str, abstract: Any = None, prefer_ema: bool = True) -> Any:
    """Params (EMA if present and preferred). `abstract`: ShapeDtypeStructs with shardings of the params tree."""
    directory = os.path.abspath(os.path.expanduser(directory))
    if not is_params_dir(directory):
        raise CheckpointError(f"{directory} is not a jaxgen params checkpoint (expected {directory}/params and {META}); "
                              f"convert official weights with `python -m jaxgen.convert` or give a run's workdir")
    ckptr = ocp.StandardCheckpointer()
    path = os.path.join(directory, "params")
    try:
        meta_tree = ckptr.metadata(path)
        keys = set(getattr(meta_tree, "item_metadata", meta_tree).keys()) if meta_tree is not None else {"params"}
    except Exception:  # noqa: BLE001
        keys = {"params"}
    key = "ema_params" if (prefer_ema and "ema_params" in keys) else "params"
    try:
        if abstract is None:
            tree = ckptr.restore(path)
            return jax.tree_util.tree_map(np.asarray, tree[key])
        target = {k: abstract for k in keys if k in ("params", "ema_params")}
        tree = ckptr.restore(path, target)
        return tree[key]
    except Exception as e:  # noqa: BLE001
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read params from {directory}: {msg[:300]}; check that it was written for this "
                              f"family and config") from None
