"""One way to build a module or a settings object from a config section: a key it does not take is an error.

Every config section that configures an object (`config.model` -> the family's linen module, `config.loss` /
`config.sample` -> the family's settings dataclasses) goes through `build`, so a misspelt or stale key can never be
silently ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

from jaxgen.errors import ConfigError

# linen's dataclass bookkeeping fields, never configuration
_INTERNAL = ("parent", "name")


def field_names(cls) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _INTERNAL and f.init)


def _plain(value):
    # ConfigDict stores sequences as lists or tuples; linen fields must be hashable
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def check_keys(cls, section: Optional[Mapping[str, Any]], where: str, exclude: Tuple[str, ...] = ()) -> dict:
    """`section` as a dict after checking each key is a field of `cls` (minus `exclude`, which the caller fills)."""
    given = {} if section is None else {k: _plain(v) for k, v in dict(section).items()}
    allowed = [f for f in field_names(cls) if f not in exclude]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"{where} has key(s) {', '.join(unknown)} that {cls.__name__} does not take; remove them "
                          f"(valid keys: {', '.join(sorted(allowed))})")
    return given


def build(cls, section: Optional[Mapping[str, Any]], where: str, **derived):
    """cls(**section, **derived). `derived` are values the family computes (dtypes, sizes taken from the tokenizer);
    a section may not set them too."""
    kwargs = check_keys(cls, section, where, exclude=tuple(derived))
    try:
        return cls(**kwargs, **derived)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """For a family whose config.loss / config.sample has no family-specific keys."""
