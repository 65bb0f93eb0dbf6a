"""Typed, strict, composable YAML configs.

A config file is YAML whose optional ``base:`` key lists other config files (paths relative
to the file) merged first, so studies compose stage configs instead of copying them.
Command-line overrides are ``dotted.key=value`` with YAML-typed values. The merged mapping
is then built into the stage's dataclass: an unknown key or a value of the wrong type is an
error naming its dotted path, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import uuid
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is invalid; the message names its dotted path."""


def deep_merge(base: dict, update: dict) -> dict:
    """Return ``base`` updated recursively by ``update`` (mappings merge, all else replaces)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_yaml(path: str | Path) -> dict:
    """Load a YAML config, resolving its ``base:`` chain (no overrides)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml(path.parent / base))
    return deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b.c=value`` overrides; the value is parsed as YAML (``1e-3`` is a float)."""
    data = dict(data)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override '{override}' is not of the form key.path=value")
        dotted, raw = override.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, str):
            value = _maybe_number(value)
        patch: dict = {}
        cursor = patch
        keys = dotted.strip().split(".")
        for key in keys[:-1]:
            cursor[key] = {}
            cursor = cursor[key]
        cursor[keys[-1]] = value
        data = deep_merge(data, patch)
    return data


def _maybe_number(text: str) -> Any:
    # YAML 1.1 reads "1e-5" as a string; users mean a float.
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def load_config(cls: type[T], path: str | Path | None, overrides=(), defaults: dict | None = None) -> T:
    """Build dataclass ``cls`` from ``defaults`` <- YAML file <- overrides."""
    data = dict(defaults or {})
    if path is not None:
        data = deep_merge(data, load_yaml(path))
    return from_dict(cls, apply_overrides(data, list(overrides)))


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"'{_join(where, k)}'" for k in unknown)
        raise ConfigError(f"unknown option(s) {names}; {cls.__name__} takes: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{where or cls.__name__}: {error}") from error


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{where}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, str):
            value = _maybe_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def to_dict(config: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists for YAML)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write via a unique temp file + rename: a reader (another rank under torchrun, or a
    resumed run after a crash) sees the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def save_config(config: Any, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (what actually ran, diffable)."""
    return write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))
