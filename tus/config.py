"""Typed, strict, composable configs: the stages' dataclasses parsed by jsonargparse.

The schema of every stage is its config dataclass (as LightningCLI uses class signatures):
jsonargparse checks each value against the field's type, so an unknown key or a value of the
wrong type fails naming its dotted path, and a string option stays a string (``name=no`` is
``"no"``, not ``False``; ``name=0123`` is ``"0123"``).

A config is YAML. Its optional ``base:`` key lists other configs merged first (paths relative
to the file), so studies compose stage configs instead of copying them. ``--config`` takes a
path or the name of a config shipped inside the package (``finetune/cpu`` is
``tus/configs/finetune/cpu.yaml``, the same files as the checkout's ``experiments/``), so every
command works from any folder. Overrides are ``--dotted.key=value`` (``dotted.key=value`` is
accepted too), applied after the files in the order given.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import os
import re
import typing
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from jsonargparse import ArgumentParser, Namespace

T = TypeVar("T")

PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config key or value is invalid; the message names its dotted path (and file)."""


# ------------------------------------------------------------------------------- files


def packaged_config_names() -> list[str]:
    """Names ``--config`` resolves inside the package, e.g. ``finetune/cpu``."""
    return sorted(str(p.relative_to(PACKAGED_CONFIGS).with_suffix("")) for p in PACKAGED_CONFIGS.rglob("*.yaml"))


def resolve_config_path(name: str | Path) -> Path:
    """A config file: an existing path, else a packaged config's name (``.yaml`` optional)."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / path
    for candidate in (packaged, packaged.with_name(packaged.name + ".yaml")):
        if candidate.is_file() and PACKAGED_CONFIGS in candidate.resolve().parents:
            return candidate
    raise ConfigError(f"{name}: config file not found (neither a path nor a packaged config; packaged: {', '.join(packaged_config_names())})")


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Load a YAML config, resolving its ``base:`` chain (no overrides)."""
    path = resolve_config_path(path)
    key = path.resolve()
    if key in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, key))
        raise ConfigError(f"{path}: 'base:' files form a cycle: {cycle}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read config ({error})") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict = {}
    for base in bases:
        try:
            resolve_config_path(path.parent / str(base))
        except ConfigError:
            raise ConfigError(f"{path}: its 'base: {base}' names a config that does not exist ({path.parent / str(base)}; base paths are relative to the file naming them)") from None
        merged = deep_merge(merged, load_yaml(path.parent / base, (*_chain, key)))
    return deep_merge(merged, data)


def deep_merge(base: dict, update: dict) -> dict:
    """Return ``base`` updated recursively by ``update`` (mappings merge, all else replaces)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# ------------------------------------------------------------------------------ parsing


def config_parser(cls: type, prog: str | None = None, description: str | None = None) -> ArgumentParser:
    """The jsonargparse parser of dataclass ``cls``: one ``--dotted.key`` option per field."""
    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, default_env=False)
    parser.add_class_arguments(cls, None, fail_untyped=True)
    return parser


def _schema_parser(cls: type) -> ArgumentParser:
    """:func:`config_parser` of ``cls``, made once per process: building one takes ~0.1 s, and a
    study builds each stage's config many times (build_config only parses with it)."""
    if cls not in _SCHEMA_PARSERS:
        _SCHEMA_PARSERS[cls] = config_parser(cls)
    return _SCHEMA_PARSERS[cls]


_SCHEMA_PARSERS: dict[type, ArgumentParser] = {}


def normalize_overrides(overrides: Sequence[str]) -> list[str]:
    """``a.b=value`` or ``--a.b=value`` -> ``--a.b=value`` (what jsonargparse parses)."""
    normalized = []
    for override in overrides:
        text = override[2:] if override.startswith("--") else override
        if "=" not in text or not text.split("=", 1)[0].strip():
            raise ConfigError(f"override '{override}' is not of the form --key.path=value")
        key, value = text.split("=", 1)
        normalized.append(f"--{key.strip()}={value}")
    return normalized


def build_config(cls: type[T], data: dict | None = None, overrides: Sequence[str] = (), where: str = "", key_prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, then ``--key=value`` overrides, strictly.

    ``where`` (a file) prefixes error messages; ``key_prefix`` is prepended to the dotted keys
    they name (``method.`` for a plug-in's options)."""
    parser = _schema_parser(cls)
    data, overrides = _apply_mapping_overrides(cls, dict(data or {}), normalize_overrides(overrides))
    try:
        for override in overrides:
            data = _replace_value(parser, data, override)
    except (argparse.ArgumentError, TypeError, ValueError) as error:
        raise ConfigError(_one_line(error, "", key_prefix)) from error  # the override names itself
    try:
        namespace = parser.parse_object(data, defaults=True)
        built = parser.instantiate(namespace)
    except ConfigError:
        raise
    except (argparse.ArgumentError, TypeError, ValueError) as error:
        raise ConfigError(_one_line(error, where, key_prefix)) from error
    return _to_dataclass(cls, built)


def _replace_value(parser: ArgumentParser, data: dict, override: str) -> dict:
    """``data`` with one ``--a.b=value`` override: the value parsed by its field's type (a string
    option stays a string) and replacing the old value (a list is replaced, not merged)."""
    key = override[2:].split("=", 1)[0]
    try:
        value = parser.parse_args([override], defaults=False)[key]
    except KeyError as error:  # jsonargparse accepted a prefix of the key but has no such option
        raise ConfigError(f"unknown option '{key}'") from error
    plain = value.as_dict() if isinstance(value, Namespace) else [v.as_dict() if isinstance(v, Namespace) else v for v in value] if isinstance(value, list) else value
    *parents, leaf = key.split(".")
    patch: dict = {leaf: plain}
    for part in reversed(parents):
        patch = {part: patch}
    merged = deep_merge(data, patch)
    cursor = merged
    for part in parents:
        cursor = cursor[part]
    cursor[leaf] = plain  # replace, never merge, the overridden value itself
    return merged


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """``data`` with ``--a.b=value`` overrides merged in (values parsed as YAML), unchecked:
    for mappings that are checked later against their schema (a study's stage options)."""
    for override in normalize_overrides(overrides):
        key, raw = override[2:].split("=", 1)
        patch: dict = {}
        cursor = patch
        *parents, leaf = key.split(".")
        for part in parents:
            cursor = cursor.setdefault(part, {})
        cursor[leaf] = yaml.safe_load(raw) if raw.strip() else None
        data = deep_merge(data, patch)
    return data


def _apply_mapping_overrides(cls: type, data: dict, overrides: list[str]) -> tuple[dict, list[str]]:
    """Overrides into a field typed as a mapping (a plug-in's options, e.g. ``method``) are
    merged into ``data`` here; the owner checks them against the plug-in's own schema."""
    hints = typing.get_type_hints(cls)
    mapping_fields = {f.name: f for f in dataclasses.fields(cls) if hints[f.name] is dict or typing.get_origin(hints[f.name]) is dict}
    rest = []
    for override in overrides:
        key = override[2:].split("=", 1)[0]
        name = key.split(".")[0]
        if name not in mapping_fields:
            rest.append(override)
            continue
        if "." not in key:  # the whole mapping, e.g. --method={name: mae}
            raw = override.split("=", 1)[1]
            data[name] = yaml.safe_load(raw) if raw.strip() else {}
            continue
        if name not in data:
            field_ = mapping_fields[name]
            default: Any = field_.default_factory() if field_.default_factory is not dataclasses.MISSING else field_.default
            data[name] = dict(default or {})
        data = apply_overrides(data, [override])
    return data, rest


def load_config(cls: type[T], path: str | Path | Sequence[str | Path] | None, overrides: Sequence[str] = (), defaults: dict | None = None) -> T:
    """Build dataclass ``cls`` from ``defaults`` <- config file(s) <- overrides."""
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    data = dict(defaults or {})
    for each in paths:
        data = deep_merge(data, load_yaml(each))
    where = str(paths[-1]) if paths else ""
    return build_config(cls, data, overrides, where=where)


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping (no overrides); errors are prefixed by ``where``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping for {cls.__name__}, got {data!r}")
    return build_config(cls, data, where=where)


def _to_dataclass(cls: type[T], built: Any) -> T:
    """``cls`` from what jsonargparse instantiated: the top level stays a Namespace whose
    nested dataclass groups are already instances."""
    if isinstance(built, cls):
        return built
    fields = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    return cls(**{name: value for name, value in vars(built).items() if name in fields})


_UNKNOWN_OPTION = re.compile(r"Group '([^']*)' does not accept (?:nested key|option) '([^']*)'")
_UNRECOGNIZED = re.compile(r"[Uu]nrecognized arguments: (.*)")
_NOT_ACCEPTED = re.compile(r"Option '([^']*)' is not accepted")
_KEY_PROBLEM = re.compile(r'Parser key "([^"]+)":\s*(.*)', re.S)


def _one_line(error: BaseException, where: str, key_prefix: str = "") -> str:
    """jsonargparse's multi-line messages as one line naming the dotted key."""
    text = str(error)
    if match := _UNKNOWN_OPTION.search(text):
        group, key = match.groups()
        message = f"unknown option '{key_prefix}{group + '.' if group else ''}{key}'"
    elif match := _UNRECOGNIZED.search(text):
        keys = [word.split("=", 1)[0].lstrip("-") for word in match.group(1).split() if word.startswith("--")]
        message = f"unknown option {', '.join(repr(key_prefix + k) for k in keys) or match.group(1).strip()}"
    elif (match := _NOT_ACCEPTED.search(text)) and not _KEY_PROBLEM.search(text):
        message = f"unknown option '{key_prefix}{match.group(1)}'"
    elif match := _KEY_PROBLEM.search(text):
        key, problem = match.groups()
        detail = " ".join(line.strip() for line in problem.splitlines() if line.strip())
        detail = re.sub(r"Expected a <class '(\w+)'>\. Got value: (.*)", r"expected \1, got '\2'", detail)
        detail = re.sub(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", r"'\2' is not one of \1", detail)
        message = f"{key_prefix}{key}: {detail}"
    else:
        message = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return f"{where}: {message}" if where else message


def require_at_least(config: Any, prefix: str, minimum: int = 1, *names: str) -> None:
    """Refuse a config whose fields ``names`` are below ``minimum``, naming the dotted key (a
    zero image size or a negative batch would otherwise fail deep inside a library)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ConfigError(f"{prefix}{name} must be >= {minimum}, got {value}")


# Seeds reach NumPy (SeedSequence, Lightning's seed_everything), which takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


def require_seeds(key: str, *seeds: int) -> None:
    """Refuse seeds NumPy cannot take, naming the config key (NumPy's own message names none)."""
    bad = [seed for seed in seeds if not 0 <= seed <= MAX_SEED]
    if bad:
        raise ConfigError(f"{key}: seed(s) {bad} out of range; seeds must be integers in 0 .. {MAX_SEED} (2**32 - 1)")


def resolve_class(name: str, registry: dict[str, str], base: type, what: str) -> type:
    """A class by registry name (``registry[name]`` is ``"module:Class"``) or by an importable
    ``package.module.Class`` path, checked to subclass ``base``: how plug-ins are named."""
    target = registry.get(name)
    if target is None and "." not in name:
        raise ConfigError(f"unknown {what} {name!r}; registered: {', '.join(sorted(registry))}, or give a class path such as my_package.module.MyClass")
    module_name, _, class_name = target.partition(":") if target else name.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"cannot import {what} {name!r} ({error})") from error
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{name!r} is not a {base.__module__}.{base.__qualname__} subclass")
    return cls


# ------------------------------------------------------------------------------- output


def to_dict(config: Any) -> dict:
    """Plain nested dict of a config dataclass (tuples become lists for YAML)."""
    return _plain(dataclasses.asdict(config))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_yaml(config: Any) -> str:
    """The resolved config as YAML (what ``--print_config`` prints and ``config.yaml`` holds)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write via a unique temp file + rename: a reader (another rank under torchrun, or a
    resumed run after a crash) sees the old file or the whole new one, never half. A full
    disk or a read-only folder leaves the old file and no temp file (:class:`StorageError`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise as_storage_error(error, path) from error
    return path


# Why a write failed, in words, for the errors a full disk, a read-only mount, a quota or
# the wrong owner give: they are the user's to fix, not tracebacks.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EFBIG: "file too large for this file system",
}


class StorageError(ValueError):
    """A file or folder could not be written (full disk, read-only, no permission); one line."""


def is_storage_error(error: BaseException) -> bool:
    return isinstance(error, StorageError) or (isinstance(error, OSError) and error.errno in STORAGE_ERRNOS)


def as_storage_error(error: OSError, path: str | Path, option: str | None = None) -> StorageError | OSError:
    """``error`` as one line naming ``path`` (and the option that chose it) and the cause;
    errors other than storage errors are returned unchanged (a bug keeps its traceback)."""
    if isinstance(error, StorageError) or error.errno not in STORAGE_ERRNOS:
        return error
    where = f"{option} {path}" if option else str(path)
    return StorageError(f"{where}: cannot write: {STORAGE_ERRNOS[error.errno]} ({errno.errorcode[error.errno]})")


def fsync_folder(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_config(config: Any, path: str | Path) -> Path:
    """Write the fully resolved config as YAML (what actually ran, diffable)."""
    return write_text_atomic(path, to_yaml(config))


def changed_keys(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings (added or removed too)."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys: list[str] = []
        for key in sorted(set(before) | set(after), key=str):
            keys += changed_keys(before.get(key), after.get(key), f"{prefix}{key}.")
        return keys
    return [] if before == after else [prefix.rstrip(".")]
