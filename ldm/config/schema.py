"""Typed configs from YAML: dataclasses are the schema; unknown keys and wrong types raise ``ConfigError`` naming the
dotted key; ``key.sub=value`` overrides (values parsed as YAML) are applied before validation.

The sections themselves are the other modules of ``ldm.config``; this module is the machinery that reads, checks,
writes and flattens any such dataclass, the range checks their ``check`` methods share, and the mark a field carries
when its value defines what a checkpoint's weights mean (``defining``; read by ``ldm.config.resume``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import MISSING
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem; the message starts with the dotted key it is about."""


MODEL_DEFINING = "model_defining"  # field metadata: True when a change alters what checkpoint weights mean


def defining(default: Any = MISSING, *, factory: Any = MISSING, defines: bool = True) -> Any:
    """A dataclass field marked as defining the model (``defines=False``: an exception inside a defining section);
    a section's unmarked fields inherit the section's mark."""
    return dataclasses.field(default=default, default_factory=factory, metadata={MODEL_DEFINING: defines})


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Read YAML (or start from defaults), apply ``key=value`` overrides, validate against ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder, not a YAML file")
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is unreadable: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
        if data is None:
            raise ConfigError(f"config file {path} is empty (give no --config to start from the defaults)")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        apply_override(data, item)
    cfg = from_dict(cls, data)
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrong types by dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not match {_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict to dotted keys (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def value_at(cfg: Any, key: str) -> Any:
    """The value of a dotted key of a config object."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def require_positive(cfg: Any, *keys: str) -> None:
    """Each key's value is a finite number > 0."""
    for key in keys:
        value = value_at(cfg, key)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{key}: must be a positive number, got {value}")


def require_non_negative(cfg: Any, *keys: str) -> None:
    """Each key's value is a finite number >= 0."""
    for key in keys:
        value = value_at(cfg, key)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{key}: must be a finite number >= 0, got {value}")
