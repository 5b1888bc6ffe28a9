"""Config files from Python (notebooks, scripts): the same `configs/x.py[:arg]` syntax as `jaxgen.main`.

    from jaxgen import config as config_lib
    config = config_lib.load("configs/mar_tiny.py", {"sample.num_per_class": 10})
    config = config_lib.load("mar_l:nocfg")     # a config of the installed `configs` package, by name
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any, Mapping, Optional

import ml_collections

from jaxgen.errors import ConfigError


def _module(path_or_name: str):
    if path_or_name.endswith(".py") or os.sep in path_or_name:
        if not os.path.exists(path_or_name):
            raise ConfigError(f"config file {path_or_name} does not exist; pass a path such as configs/mar_tiny.py")
        spec = importlib.util.spec_from_file_location("jaxgen_user_config", path_or_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(f"configs.{path_or_name}")
    except ModuleNotFoundError:
        raise ConfigError(f"no config named {path_or_name!r} in the configs package; pass a file path "
                          f"(configs/<name>.py) or one of the names in configs/") from None


def load(spec: str, overrides: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
    """`path.py[:arg]` or `name[:arg]` -> a locked ConfigDict, with dotted-key `overrides` applied
    ({"optim.lr": 1e-3}); an unknown key is a ConfigError, as `--config.<key>` is on the command line."""
    where, _, arg = spec.partition(":")
    module = _module(where)
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    apply_overrides(config, overrides or {}, where)
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str = "the config"):
    """Set dotted keys of an existing (locked) config; lists become tuples (config sequences are tuples)."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        value = tuple(value) if isinstance(value, list) else value
        try:
            for p in parents:
                node = node[p]
            node[leaf] = value
        except (KeyError, AttributeError):
            raise ConfigError(f"config has no key {key!r}; check the spelling against {where}") from None
        except TypeError as e:
            raise ConfigError(f"cannot set {key}={value!r}: {e}") from None
    return config


def load_overrides_file(path: str) -> dict:
    """A JSON file of {dotted key: value} (what `--mode=search` writes as best_policy.json)."""
    import json

    if not os.path.isfile(path):
        raise ConfigError(f"overrides file {path} does not exist; pass a JSON file of {{\"key\": value}}, e.g. "
                          f"<workdir>/search/best_policy.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise ConfigError(f"overrides file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"overrides file {path} must hold one JSON object of {{\"dotted.key\": value}}")
    return data
