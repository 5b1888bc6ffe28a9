"""Official MAR `diffloss.net.*` (SimpleMLPAdaLN) torch weights -> jaxgen `SimpleMLPAdaLN` params."""
from __future__ import annotations

import re
from typing import Dict

import numpy as np

from jaxgen.convert.torch_layout import StateDict

# torch sub-module -> jaxgen sub-module for the Linear layers outside the residual blocks.
_TOP_LINEARS = {"time_embed.mlp.0": "time_embed_0", "time_embed.mlp.2": "time_embed_2",
                "cond_embed": "cond_embed", "input_proj": "input_proj"}
_BLOCK_LINEARS = {"mlp.0": "mlp_0", "mlp.2": "mlp_2", "adaLN_modulation.1": "ada_ln"}


def _num_res_blocks(keys, prefix: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"res_blocks\.(\d+)\.", k))}
    if idx != set(range(len(idx))):
        raise ValueError(f"res_blocks indices under {prefix!r} are not contiguous from 0: {sorted(idx)}")
    return len(idx)


def convert_simple_mlp_adaln(sd: StateDict, prefix: str = "diffloss.net.") -> Dict:
    """Map `{prefix}time_embed.mlp.0/2, cond_embed, input_proj, res_blocks.i.{in_ln, mlp.0, mlp.2,
    adaLN_modulation.1}, final_layer.{linear, adaLN_modulation.1}` to params; Linear (out,in) -> kernel (in,out).

    `final_layer.norm_final` has no affine parameters, so it has no keys. Raises ValueError on any missing or
    unexpected key under `prefix` (keys outside `prefix` are ignored: the MAR state_dict holds other modules).
    """
    keys = [k for k in sd if k.startswith(prefix)]
    if not keys:
        raise ValueError(f"no keys start with {prefix!r}")
    depth = _num_res_blocks(keys, prefix)
    used = []

    def lin(torch_name):
        base = prefix + torch_name
        needed = [base + ".weight", base + ".bias"]
        missing = [k for k in needed if k not in sd]
        if missing:
            raise ValueError(f"missing keys: {missing}")
        used.extend(needed)
        w = np.asarray(sd[base + ".weight"])
        b = np.asarray(sd[base + ".bias"])
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"{base}: weight {w.shape} / bias {b.shape} is not a Linear layout")
        # A transposed VIEW, not torch_layout.linear's contiguous copy: full-size key checks feed zero-stride
        # broadcast arrays, which must stay free; jnp.asarray copies real weights on transfer anyway.
        return {"kernel": np.asarray(w, np.float32).T, "bias": np.asarray(b, np.float32)}

    params: Dict = {ours: lin(theirs) for theirs, ours in _TOP_LINEARS.items()}
    for i in range(depth):
        block = {ours: lin(f"res_blocks.{i}.{theirs}") for theirs, ours in _BLOCK_LINEARS.items()}
        ln = f"{prefix}res_blocks.{i}.in_ln"
        missing = [k for k in (ln + ".weight", ln + ".bias") if k not in sd]
        if missing:
            raise ValueError(f"missing keys: {missing}")
        used.extend([ln + ".weight", ln + ".bias"])
        block["in_ln"] = {"scale": np.asarray(sd[ln + ".weight"], np.float32),
                          "bias": np.asarray(sd[ln + ".bias"], np.float32)}
        params[f"res_blocks_{i}"] = block
    params["final_layer"] = {"linear": lin("final_layer.linear"),
                             "ada_ln": lin("final_layer.adaLN_modulation.1")}

    unexpected = sorted(set(keys) - set(used))
    if unexpected:
        raise ValueError(f"unexpected keys under {prefix!r}: {unexpected}")
    _check_widths(params, depth)
    return params


def _check_widths(params: Dict, depth: int) -> None:
    """Shapes must chain (in -> w -> ... -> out); catches weights from mismatched configs early."""
    w = params["input_proj"]["kernel"].shape[1]
    expect = {("time_embed_0",): (None, w), ("time_embed_2",): (w, w), ("cond_embed",): (None, w),
              ("final_layer", "ada_ln"): (w, 2 * w), ("final_layer", "linear"): (w, None)}
    for i in range(depth):
        expect[(f"res_blocks_{i}", "mlp_0")] = (w, w)
        expect[(f"res_blocks_{i}", "mlp_2")] = (w, w)
        expect[(f"res_blocks_{i}", "ada_ln")] = (w, 3 * w)
    for path, (fi, fo) in expect.items():
        node = params
        for p in path:
            node = node[p]
        shape = node["kernel"].shape
        if (fi is not None and shape[0] != fi) or (fo is not None and shape[1] != fo):
            raise ValueError(f"{'.'.join(path)} kernel {shape} does not fit width {w}")
    for i in range(depth):
        if params[f"res_blocks_{i}"]["in_ln"]["scale"].shape != (w,):
            raise ValueError(f"res_blocks_{i}.in_ln has shape {params[f'res_blocks_{i}']['in_ln']['scale'].shape}, "
                             f"expected ({w},)")
