"""The DiffLoss denoiser (`diffloss.net.*` of a `mar` fixture) for the `mar_diffusion` / `mar_diffloss` parity tests.

Those fixtures carry no weights of their own: they name the `mar` fixture whose `diffloss.net.*` they use (JSON
`weights_file` / `denoiser`). The weights file is found from that text; failing that, among the `mar` fixtures, the
one whose denoiser widths fit the fixture's arrays. The denoiser config is read from the weights' shapes.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Optional, Tuple

import numpy as np
import pytest

from jaxgen.convert.diffloss import convert_simple_mlp_adaln
from jaxgen.nn.diffusion_head import SimpleMLPAdaLN
from tests.parity.fixtures import Fixture, fixtures_of

PREFIX = "diffloss.net."


def _named_weight_files(meta: dict):
    text = " ".join(str(meta.get(k) or "") for k in ("weights_file", "denoiser"))
    return re.findall(r"[\w.-]+_weights\.npz", text)


def denoiser_kwargs(sd: Dict[str, np.ndarray], prefix: str = PREFIX) -> Dict[str, int]:
    """SimpleMLPAdaLN constructor kwargs from the torch state_dict's shapes."""
    w, c_in = sd[prefix + "input_proj.weight"].shape
    depth = len({int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"res_blocks\.(\d+)\.", k))})
    return dict(in_channels=int(c_in), model_channels=int(w),
                out_channels=int(sd[prefix + "final_layer.linear.weight"].shape[0]),
                z_channels=int(sd[prefix + "cond_embed.weight"].shape[1]), num_res_blocks=depth,
                frequency_embedding_size=int(sd[prefix + "time_embed.mlp.0.weight"].shape[1]))


def _fits(sd, x_dim: Optional[int], c_dim: Optional[int]) -> bool:
    if PREFIX + "input_proj.weight" not in sd:
        return False
    kw = denoiser_kwargs(sd)
    return (x_dim is None or kw["in_channels"] == x_dim) and (c_dim is None or kw["z_channels"] == c_dim)


def denoiser_weights(fx: Fixture, x_dim: Optional[int] = None, c_dim: Optional[int] = None) -> Dict[str, np.ndarray]:
    """The torch state_dict holding `diffloss.net.*` for fixture `fx` (x_dim / c_dim: widths its arrays need)."""
    for fname in _named_weight_files(fx.meta):
        path = os.path.join(fx.directory, fname)
        if os.path.exists(path):
            with np.load(path) as z:
                sd = {k: z[k] for k in z.files}
            if _fits(sd, x_dim, c_dim):
                return sd
    for mar in fixtures_of("mar"):
        if _fits(mar.weights, x_dim, c_dim):
            return mar.weights
    pytest.fail(f"{fx.name}: no `mar` fixture with diffloss.net.* weights of widths x {x_dim}, c {c_dim} "
                f"in {fx.directory}")


def build_denoiser(sd: Dict[str, np.ndarray], expect: Optional[dict] = None) -> Tuple[SimpleMLPAdaLN, dict]:
    """-> (module, params) with the converted weights; `expect`: constructor kwargs the fixture states."""
    kw = denoiser_kwargs(sd)
    if expect:
        stated = {k: int(v) for k, v in expect.items() if k in kw}
        assert stated == {k: kw[k] for k in stated}, f"denoiser kwargs {stated} do not match the weights {kw}"
    return SimpleMLPAdaLN(**kw), convert_simple_mlp_adaln(sd, PREFIX)
