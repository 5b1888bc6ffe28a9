"""NAT checkpoints -> jaxgen: the converter of config.model.backbone (AutoNAT's `nnet_ema.pth` for 'uvit', the
original MaskGIT flax checkpoint for 'maskgit')."""
from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np


def convert_nat(state_dict: Mapping[str, np.ndarray], config=None) -> Dict[str, Any]:
    model = config.get("model") if config is not None and hasattr(config, "get") else None
    backbone = str((model or {}).get("backbone", "uvit"))
    if backbone == "uvit":
        from jaxgen.convert.autonat import convert_autonat

        return convert_autonat(state_dict, config)
    if backbone == "maskgit":
        from jaxgen.convert.maskgit import convert_maskgit

        fields = dict(model)
        codebook = (config.get("tokenizer") or {}).get("config")
        if codebook is not None and "codebook_size" not in fields:
            fields["codebook_size"] = int(codebook.model.codebook_size)
        fields.pop("backbone", None)
        return convert_maskgit(state_dict, fields)
    raise ValueError(f"no converter for NAT backbone {backbone!r}")
