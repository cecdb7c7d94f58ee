"""Config base shared by both stages: errors, structured merge, field checks, saving.

Each stage declares its schema as dataclasses and validates its own semantics; what every
stage does the same way lives here: a YAML file merged onto the schema (OmegaConf structured
configs), ``key=value`` overrides on top, every failure a :class:`ConfigError` that starts with
the field name, and the resolved config written atomically next to the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.files import write_text_atomic


class ConfigError(ValueError):
    """A configuration problem, always phrased as ``field: what is wrong (what is allowed)``."""


def format_omegaconf_error(err: OmegaConfBaseException) -> str:
    """Turn OmegaConf's multi-line messages into one line that starts with the field name."""
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Missing mandatory value" in msg:
        return f"{key}: required field is missing (set it in the YAML or as {key}=...)"
    if "not in" in msg and "Key" in msg:
        return f"{key}: unknown key ({msg})"
    return f"{key}: {msg}" if key else msg


def parse_override(item: str) -> DictConfig:
    """One ``key=value`` (the value is YAML: numbers, lists, quoted strings) -> a config layer."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. trainer.max_steps=100")
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as err:
        hint = ' (quote list items holding braces: data.data_path=["a/{000..009}.tar"])'
        raise ConfigError(f"override {item!r}: value is not valid YAML: {str(err).splitlines()[0]}{hint}") from None


def merge_structured(schema_cls: type, path: str | Path | None, overrides: list[str] | None) -> Any:
    """Schema dataclass <- YAML file <- ``key=value`` overrides -> a dataclass instance.

    Shared by both stages' configs (``fusedit.config`` and ``repae.config``): every failure is a
    :class:`ConfigError` naming the field (unknown key, wrong type, missing required value).
    """
    layers: list[DictConfig] = [OmegaConf.structured(schema_cls)]
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            loaded = OmegaConf.load(p)
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"{p}: top level must be a mapping of sections")
            layers.append(loaded)
        layers.extend(parse_override(item) for item in overrides or [])
        merged = OmegaConf.merge(*layers)
        OmegaConf.resolve(merged)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(
                "; ".join(f"{k}: required field is missing (set it in the YAML or as {k}=...)" for k in missing)
            )
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(format_omegaconf_error(err)) from None
    assert isinstance(cfg, schema_cls)
    return cfg


def check_choice(errors: list[str], name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        errors.append(f"{name}: {value!r} is not one of {', '.join(map(repr, choices))}")


def check_positive(errors: list[str], name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        errors.append(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_rate(errors: list[str], name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        errors.append(f"{name}: must be a probability in [0, 1], got {value!r}")


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
