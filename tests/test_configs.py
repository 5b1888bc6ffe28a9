"""Every config in configs/ (every variant) loads and builds its family strictly; every key is read by something.

Strictness: `config.model` builds the family's module and `config.loss` / the family keys of `config.sample` build its
settings dataclasses (`jaxgen.strict`), so a key no module or setting takes fails the build. The remaining keys are
the family-agnostic ones of `configs.common.base_config`, each of which the spine reads (checked below by name).
"""
import glob
import importlib
import os
import re

import jax
import pytest

from configs.common import base_config
from jaxgen import config as config_lib
from jaxgen import families
from jaxgen.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
               if not os.path.basename(p).startswith("_") and os.path.basename(p) not in ("common.py",)
               and not p.endswith("_common.py"))
SPECS = [f"{n}:{v}" if v else n for n in NAMES
         for v in ("",) + tuple(getattr(importlib.import_module(f"configs.{n}"), "VARIANTS", ()))]
# Sections whose keys are checked by the family's strict builders.
STRICT_SECTIONS = ("model", "loss", "sample")


def _leaves(d, prefix=""):
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _leaves(v, path + ".")
        else:
            yield path


def test_every_config_is_listed():
    assert {"mar_tiny", "var_tiny", "mar_b", "var_d16", "kl16", "vqvae_256"} <= set(NAMES)


@pytest.mark.parametrize("spec", SPECS)
def test_config_builds_its_family(spec):
    config = config_lib.load(spec)
    fam = families.build(config)  # strict: unknown model / loss / sample keys raise
    if ":" not in spec:  # abstractly, no allocation (the paper sizes too)
        params = jax.eval_shape(fam.init, jax.random.PRNGKey(0))
        assert jax.tree_util.tree_leaves(params)
    generic = set(_leaves(base_config().to_dict()))
    configs = [config.to_dict()]
    if config.get("tokenizer") is not None and config.tokenizer.get("config") is not None:
        configs.append(config.tokenizer.config.to_dict())  # the tokenizer stage is a run config of its own
    if config.get("tokenizer") is not None and config.tokenizer.get("config") is not None:
        tok = families.tokenizer_run_config(config)  # the dataset named once: the tokenizer stage reads config.data
        for field in families.DATASET_FIELDS:
            want = config.tokenizer.data.get(field, config.data[field])
            assert tok.data[field] == want, (spec, field)
    for cfg in configs:
        cfg.get("tokenizer", {}).pop("config", None)
        # tokenizer.data holds data fields (tokenizer_run_config rejects any other key)
        extra = [k for k in _leaves(cfg) if k not in generic and k.split(".")[0] not in STRICT_SECTIONS
                 and not (k.startswith("tokenizer.data.") and f"data.{k.split('.')[-1]}" in generic)]
        assert not extra, f"{spec}: keys outside base_config and the strict sections: {extra}"


def test_every_generic_key_is_read_by_the_spine():
    """Each key of base_config is named somewhere in jaxgen/ (a key nobody reads would be dead configuration)."""
    source = "\n".join(open(p).read() for p in glob.glob(os.path.join(REPO, "jaxgen", "**", "*.py"), recursive=True))
    unread = []
    for path in _leaves(base_config().to_dict()):
        leaf = path.split(".")[-1]
        if path.split(".")[0] in STRICT_SECTIONS and path.split(".")[0] != "sample":
            continue
        if not re.search(rf"(\.{leaf}\b|[\"']{leaf}[\"'])", source):
            unread.append(path)
    assert not unread, f"config keys no code reads: {unread}"


def test_a_stray_key_is_an_error_naming_it():
    config = config_lib.load("mar_tiny")
    config.model.unlock()
    config.model.mask_ratio = 0.5  # misspelt mask_ratio_min
    with pytest.raises(ConfigError, match="mask_ratio"):
        families.build(config)
    config = config_lib.load("var_tiny")
    config.sample.unlock()
    config.sample.topk = 5
    with pytest.raises(ConfigError, match="config.sample has key.*topk"):
        families.build(config)
    config = config_lib.load("kl_vae_tiny")
    config.remat = True  # a conv tokenizer has no remat
    with pytest.raises(ConfigError, match="remat"):
        families.build(config)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_variant_is_one_error_format(name):
    with pytest.raises(ConfigError, match=rf"unknown variant 'nope' for configs/{name}.py"):
        config_lib.load(f"{name}:nope")
