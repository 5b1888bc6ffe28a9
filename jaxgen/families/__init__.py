"""Family registry: config.family -> Family subclass."""
from __future__ import annotations

import importlib
from typing import Dict, Type

from jaxgen.errors import ConfigError
from jaxgen.families.base import Family

# name -> "module:Class"; imported lazily so a family's heavy deps load only when used.
_REGISTRY: Dict[str, str] = {
    "mar": "jaxgen.families.mar.family:MARFamily",
    "kl_vae": "jaxgen.families.kl_vae:KLVAEFamily",
    "var": "jaxgen.families.var.family:VARFamily",
    "msvq": "jaxgen.families.msvq:MSVQFamily",
}


class UnknownFamilyError(ConfigError):
    pass


def names():
    return sorted(_REGISTRY)


def get_class(name: str) -> Type[Family]:
    if name not in _REGISTRY:
        raise UnknownFamilyError(f"unknown family {name!r}; set config.family to one of {', '.join(names())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build(config) -> Family:
    return get_class(config.family)(config)
