"""Family registry: config.family -> Family subclass, and the one place a run's tokenizer is resolved.

Adding a family = its files under jaxgen/families/ (or jaxgen/tokenizers/ for a tokenizer's module) and ONE line in
`_REGISTRY`: the class, and the tiny config the contract test (tests/test_family_contract.py) builds it from.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple, Type

import ml_collections

from jaxgen.errors import ConfigError
from jaxgen.families.base import Family, Tokenizer

# name -> ("module:Class", tiny config "configs/<file>.py[:variant]"); classes import lazily, so a family's heavy
# dependencies load only when it is used.
_REGISTRY: Dict[str, Tuple[str, str]] = {
    "mar": ("jaxgen.families.mar.family:MARFamily", "mar_tiny:runlocal"),
    "kl_vae": ("jaxgen.families.kl_vae:KLVAEFamily", "kl_vae_tiny"),
    "var": ("jaxgen.families.var.family:VARFamily", "var_tiny:runlocal"),
    "msvq": ("jaxgen.families.msvq:MSVQFamily", "msvq_tiny"),
    "rar": ("jaxgen.families.rar.family:RARFamily", "rar_tiny:runlocal"),
    "maskgit_vqgan": ("jaxgen.families.maskgit_vqgan:MaskGITVQGANFamily", "maskgit_vqgan_tiny"),
    "nat": ("jaxgen.families.nat.family:NATFamily", "nat_tiny:runlocal"),
}


class UnknownFamilyError(ConfigError):
    pass


def names():
    return sorted(_REGISTRY)


def tiny_config_name(name: str) -> str:
    """The registered tiny config of a family (a name of the `configs` package, with its variant)."""
    return _REGISTRY[name][1]


def get_class(name: str) -> Type[Family]:
    if name not in _REGISTRY:
        raise UnknownFamilyError(f"unknown family {name!r}; set config.family to one of {', '.join(names())}")
    module, cls = _REGISTRY[name][0].split(":")
    return getattr(importlib.import_module(module), cls)


def build(config) -> Family:
    return get_class(config.family)(config)


# The dataset's identity: a tokenizer stage trains on the generator's dataset (config.data names it once).
DATASET_FIELDS = ("source", "name", "data_dir", "split", "image_size", "channels", "num_classes", "random_flip")


def tokenizer_run_config(config) -> Optional[ml_collections.ConfigDict]:
    """The run config of a generator's tokenizer stage: config.tokenizer.config with the dataset fields of config.data,
    then the tokenizer stage's own values from config.tokenizer.data. None when the run has no tokenizer."""
    tok = config.get("tokenizer")
    if tok is None or tok.get("config") is None:
        return None
    resolved = ml_collections.ConfigDict(tok.config.to_dict())
    for field in DATASET_FIELDS:
        resolved.data[field] = config.data[field]
    for key, value in dict(tok.get("data") or {}).items():
        if key not in resolved.data:
            raise ConfigError(f"config.tokenizer.data.{key} is not a data field; use one of "
                              f"{', '.join(sorted(resolved.data))}")
        resolved.data[key] = value
    resolved.data.cache = False  # a tokenizer trains on images
    resolved.lock()
    return resolved


def build_tokenizer(config) -> Optional[Tokenizer]:
    """The tokenizer of a run (`tokenizer_run_config`), checked against what the generator accepts. None when
    config.family needs no tokenizer."""
    accepted = get_class(config.family).tokenizer_families
    if not accepted:
        return None
    tok_cfg = tokenizer_run_config(config)
    if tok_cfg is None:
        raise ConfigError(f"family {config.family!r} runs on a tokenizer ({' or '.join(accepted)}): set "
                          f"config.tokenizer.config to its run config (see configs/)")
    if tok_cfg.family not in accepted:
        raise ConfigError(f"family {config.family!r} runs on a {' or '.join(accepted)} tokenizer, but "
                          f"config.tokenizer.config.family is {tok_cfg.family!r}")
    tok = build(tok_cfg)
    if not isinstance(tok, Tokenizer):
        raise ConfigError(f"family {tok_cfg.family!r} is not a tokenizer (no encode / decode)")
    return tok
