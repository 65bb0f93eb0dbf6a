"""LightningModules, one file per method, and the registry of pretraining methods.

A pretraining config names its method by registry name (``method.name: simclr_organ``) or by
an importable class path (``method.name: my_package.my_module.MyMethod``), so a user's own
method plugs in without editing tus. Adding one to tus: a file here with the module and its
``Config`` dataclass, one line in ``PRETRAINING_METHODS``, one YAML in ``configs/pretrain/``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tus.config import ConfigError, build_config, resolve_class, to_dict

# name -> "module:Class", imported on first use so a method's dependencies load only when used.
PRETRAINING_METHODS: dict[str, str] = {
    "simclr_organ": "tus.methods.simclr_organ:SimCLROrgan",
    "mae": "tus.methods.mae:MaskedAutoencoder",
}


def pretraining_method(name: str) -> Any:
    """The method class of a registry name or an importable ``package.module.Class`` path."""
    from tus.methods.base import PretrainingMethod

    try:
        return resolve_class(name, PRETRAINING_METHODS, PretrainingMethod, "pretraining method")
    except ConfigError as error:
        raise ConfigError(f"method.name: {error}") from error


def method_options(block: dict[str, Any]) -> tuple[type, Any]:
    """(method class, its built ``Config``) from a config's ``method:`` block."""
    options = dict(block)
    name = options.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError("method.name: give the pretraining method (e.g. simclr_organ or mae)")
    cls = pretraining_method(name)
    return cls, build_config(cls.Config, options, key_prefix="method.")


def resolved_method_block(block: dict[str, Any]) -> dict[str, Any]:
    """The ``method:`` block with every option of the method filled in (what ``config.yaml`` keeps)."""
    cls, options = method_options(block)
    assert dataclasses.is_dataclass(options)
    return {"name": block["name"], **to_dict(options)}
