"""One export format for every trained tus model: a folder with the weights and a config that rebuilds and feeds them.

An export is a folder::

    <folder>/model.safetensors   the state dict (safetensors: reading it cannot run code)
    <folder>/config.json         what rebuilds the network and what its input must look like

The diffusion U-Net folder is diffusers' own ``save_pretrained`` layout (``diffusion_pytorch_model.safetensors``
+ ``config.json``, read back with ``from_pretrained``); its tus keys sit under ``"_tus"`` in that config.json, a
private key diffusers ignores, so one :func:`load_export` recognises every kind.

``config.json`` keys (:func:`load_export` returns them for every kind, the U-Net's ``_tus`` keys lifted to the top):

- ``format_version`` (1; 0 marks a converted old export), ``kind`` (``encoder`` | ``classifier`` | ``unet``),
  ``tus_version`` (``tus.__version__`` of the writer; ``None`` for old exports);
- ``architecture``: ``{"library": "timm" | "diffusers", "name": ..., "kwargs": {...}}``: the timm model name with
  its constructor keyword arguments (a ViT's ``img_size``/``patch_size``/``global_pool``...), or ``UNet2DModel``
  with its diffusers config;
- ``in_chans``, ``image_size`` (the training resolution, ``None`` when unknown);
- ``normalization``: ``{"mean": [...], "std": [...]}`` per channel: the network's input is
  ``(pixel / 255 - mean) / std``;
- ``label_names`` (classifier: output index -> class name);
- kind-specific extras: encoder ``num_features``, ``organ_classes``, ``steps``, ``pretrain_run``, ``method``;
  classifier ``num_classes`` and ``hparams`` (the module's constructor arguments); U-Net ``unet``, ``process``,
  ``step``.

Old single-file exports (``NAME.safetensors`` with ``NAME.json`` beside it, tus 0.1 before this format) still load:
:func:`read_export_config` converts their JSON to the keys above (``format_version`` 0). Every weights file goes
through :func:`tus.models.weights.load_weights`, so a pickle given as an export is refused in one line.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import tus
from tus.config import write_text_atomic
from tus.data.transforms import NORMALIZE_MEAN, NORMALIZE_STD
from tus.models.weights import CheckpointError, load_weights, read_export_json

FORMAT_VERSION = 1
KINDS = ("encoder", "classifier", "unet")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# diffusers' save_pretrained names the U-Net's weights itself.
DIFFUSERS_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# The key of a diffusers config.json that holds the tus keys (diffusers drops "_"-prefixed keys when building).
DIFFUSERS_TUS_KEY = "_tus"
KIND_WORDS = {
    "encoder": "an encoder export (tus pretrain)",
    "classifier": "a fine-tuned classifier export (tus finetune-cv)",
    "unet": "a diffusion U-Net export (tus diffusion)",
}


def classifier_normalization(in_chans: int) -> dict[str, list[float]]:
    """The ``normalization`` of encoders and classifiers: ``tus.data.transforms`` (``A.Normalize``, per channel)."""
    return {"mean": [NORMALIZE_MEAN] * in_chans, "std": [NORMALIZE_STD] * in_chans}


def unet_normalization(in_chans: int) -> dict[str, list[float]]:
    """The ``normalization`` of the diffusion U-Net: pixels scaled to [-1, 1] (``pixel / 127.5 - 1``)."""
    return {"mean": [0.5] * in_chans, "std": [0.5] * in_chans}


def save_export(folder: str | Path, kind: str, weights: nn.Module | dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``folder`` (created if needed) as an export of ``kind``; returns the folder.

    ``weights`` is a module or its state dict. ``config`` holds ``architecture``, ``in_chans`` and the other keys
    of the module docstring; ``format_version``, ``kind`` and ``tus_version`` are added here. A ``unet`` must be a
    diffusers model: it is written by its own ``save_pretrained(folder, safe_serialization=True)`` and the tus keys
    go under ``"_tus"`` in diffusers' config.json. Files are replaced atomically (written aside, then renamed).
    """
    if kind not in KINDS:
        raise ValueError(f"export kind must be one of {', '.join(KINDS)}, got {kind!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "kind": kind, "tus_version": tus.__version__, **config}
    if kind == "unet":
        if not hasattr(weights, "save_pretrained"):
            raise TypeError(f"a unet export is written by diffusers' save_pretrained; got {type(weights).__name__}")
        weights.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]
        _mode_from_umask(*folder.glob("*.safetensors"))
        diffusers_config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        write_text_atomic(folder / CONFIG_FILE, json.dumps({**diffusers_config, DIFFUSERS_TUS_KEY: meta}, indent=2))
        return folder
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    partial = folder / f".{WEIGHTS_FILE}.partial"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    _mode_from_umask(partial)
    os.replace(partial, folder / WEIGHTS_FILE)
    write_text_atomic(folder / CONFIG_FILE, json.dumps(meta, indent=2))
    return folder


def _mode_from_umask(*paths: Path) -> None:
    """safetensors creates its files with mode 0600 whatever the umask: give them the mode any new
    file gets (0666 minus the umask), so a lab sharing a run folder can read the exports."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        os.chmod(path, 0o666 & ~mask)


def load_export(path: str | Path, kind: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of the export at ``path``: its folder, its config.json or its weights file.

    An old ``NAME.safetensors`` + ``NAME.json`` export is read too (its config converted). With ``kind`` given, an
    export of another kind is refused naming what it is. Raises :class:`CheckpointError` (one line).
    """
    weights, config = read_export_config(path, kind)
    state = load_weights(weights)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights}: holds a {type(state).__name__}, not a state dict of tensors")
    return config, state


def read_export_config(path: str | Path, kind: str | None = None) -> tuple[Path, dict]:
    """(weights file, config) of an export without reading its tensors; see :func:`load_export`."""
    weights, config_path, legacy = resolve_export(path)
    raw = read_export_json(config_path)
    config = _convert_legacy(raw, weights, config_path) if legacy else _native_config(raw, config_path)
    if kind is not None:
        require_kind(config, kind, weights)
    check_architecture_kwargs(config, config_path)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: weights file not found beside {config_path.name}")
    return weights, config


def check_architecture_kwargs(config: dict, source: str | Path) -> None:
    """Refuse timm ``architecture.kwargs`` that are not architecture options (issue 23).

    They are handed to ``timm.create_model``, whose loader options (``checkpoint_path``,
    ``pretrained``, ``pretrained_cfg_overlay``, ``cache_dir``...) would make timm read, and
    unpickle, a file the export names: only the model classes' own constructor options pass.
    """
    architecture = config.get("architecture") or {}
    if architecture.get("library") != "timm":
        return
    kwargs = architecture.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{source}: architecture.kwargs must be a JSON object, got {type(kwargs).__name__}")
    refused = sorted(set(kwargs) - _timm_architecture_options())
    if refused:
        raise CheckpointError(f"{source}: architecture.kwargs {', '.join(map(repr, refused))} refused: not an architecture option (it could make timm load a file); remove it from the export's config")


@functools.cache
def _timm_architecture_options() -> frozenset[str]:
    import inspect

    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    names = {name for cls in (VisionTransformer, ResNet) for name in inspect.signature(cls.__init__).parameters}
    return frozenset(names - {"self", "args", "kwargs"})


def require_kind(config: dict, kind: str, source: str | Path) -> None:
    """Refuse an export whose ``kind`` is not ``kind``, naming both (``this is an encoder export, not ...``)."""
    if config.get("kind") != kind:
        found = KIND_WORDS.get(str(config.get("kind")), f"a {config.get('kind')!r} export")
        raise CheckpointError(f"{source}: this is {found}, not {KIND_WORDS[kind]}")


def resolve_export(path: str | Path) -> tuple[Path, Path, bool]:
    """(weights file, config JSON, is an old single-file export) for an export given by any of its paths."""
    path = Path(path)
    if path.is_dir():
        config = path / CONFIG_FILE
        if not config.is_file():
            raise CheckpointError(f"{path}: a folder without {CONFIG_FILE}; a tus export is a folder with {WEIGHTS_FILE} + {CONFIG_FILE}")
        return _weights_in(path), config, False
    if path.suffix == ".json":
        if path.name == CONFIG_FILE:
            return _weights_in(path.parent), path, False
        return path.with_suffix(".safetensors"), path, True
    if not path.exists():
        raise CheckpointError(f"{path}: not found (no export there)")
    if path.suffix == ".safetensors":
        if path.with_suffix(".json").is_file():
            return path, path.with_suffix(".json"), True
        if path.name in (WEIGHTS_FILE, DIFFUSERS_WEIGHTS_FILE) and (path.parent / CONFIG_FILE).is_file():
            return path, path.parent / CONFIG_FILE, False
        raise CheckpointError(f"{path}: no {path.with_suffix('.json').name} beside it and no {CONFIG_FILE} in its folder; a tus export is a folder with {WEIGHTS_FILE} + {CONFIG_FILE}")
    # Not an export's name: load_weights says what the file is (a pickle is refused without being run).
    load_weights(path)
    raise CheckpointError(f"{path}: a bare weights file, not a tus export (a folder with {WEIGHTS_FILE} + {CONFIG_FILE})")


def _weights_in(folder: Path) -> Path:
    diffusers = folder / DIFFUSERS_WEIGHTS_FILE
    return diffusers if diffusers.is_file() and not (folder / WEIGHTS_FILE).is_file() else folder / WEIGHTS_FILE


def _native_config(raw: dict, source: Path) -> dict:
    if isinstance(raw.get(DIFFUSERS_TUS_KEY), dict):  # diffusers' config.json of a U-Net export
        diffusers_config = {k: v for k, v in raw.items() if not k.startswith("_")}
        config = dict(raw[DIFFUSERS_TUS_KEY])
        config["architecture"] = {**config.get("architecture", {}), "kwargs": diffusers_config}
    else:
        config = raw
    if config.get("kind") not in KINDS:
        raise CheckpointError(f"{source}: not a tus export config (no 'kind' among {KINDS}; keys {sorted(raw)[:5]})")
    return config


def _convert_legacy(meta: dict, weights: Path, source: Path) -> dict:
    """The config of an old ``NAME.safetensors`` + ``NAME.json`` export, in this format's keys."""
    base: dict[str, Any] = {"format_version": 0, "tus_version": None}
    if "unet" in meta and isinstance(meta["unet"], dict):
        unet = meta["unet"]
        return {
            **base,
            "kind": "unet",
            "architecture": {"library": "diffusers", "name": "UNet2DModel", "kwargs": None},
            "in_chans": unet.get("in_channels", 1),
            "image_size": unet.get("sample_size"),
            "normalization": unet_normalization(unet.get("in_channels", 1)),
            "unet": unet,
            "process": meta.get("process", {}),
            "step": meta.get("step", -1),
        }
    if isinstance(meta.get("backbone"), str) and "in_chans" in meta:
        extras = {k: v for k, v in meta.items() if k not in ("backbone", "in_chans", "vit", "image_size")}
        return {
            **base,
            "kind": "encoder",
            "architecture": {
                "library": "timm",
                "name": meta["backbone"],
                "kwargs": {k: v for k, v in (meta.get("vit") or {}).items() if k != "name"},
            },
            "in_chans": meta["in_chans"],
            "image_size": meta.get("image_size"),
            "normalization": classifier_normalization(int(meta["in_chans"])),
            **extras,
        }
    if isinstance(meta.get("backbone"), dict) and "optim" in meta:
        backbone = meta["backbone"]
        return {
            **base,
            "kind": "classifier",
            "architecture": {"library": "timm", "name": backbone.get("name"), "kwargs": {}},
            "in_chans": backbone.get("in_chans", 1),
            "image_size": None,
            "normalization": classifier_normalization(int(backbone.get("in_chans", 1))),
            "label_names": None,
            "num_classes": meta.get("num_classes", 2),
            "hparams": meta,
        }
    raise CheckpointError(f"{weights}: {source.name} has keys {sorted(meta)[:5]}, not a tus export's")
