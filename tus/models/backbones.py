"""Backbones: a timm model by name plus one of several initialisations.

``init`` is one of
- ``scratch``: random init;
- ``timm``: timm's pretrained weights, downloaded by timm, or read from ``weights`` (a local
  file in timm's format: .pth/.bin/.safetensors) so no hub is needed;
- ``uscl``: a USCL state dict (``features.*`` keys of a torchvision ResNet wrapped in
  ``nn.Sequential``; its projection/classifier heads are dropped);
- ``tus``: an encoder exported by ``tus pretrain`` (``<name>.safetensors`` + ``<name>.json``).

The backbone always returns pooled features (``num_classes=0``). Pretrained first convs are
adapted to ``in_chans`` (1 for ultrasound) by timm's channel summing. Whenever weights were
asked for and cannot be loaded, this raises: there is no silent fallback to random weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import adapt_input_conv
from torch import nn


class CheckpointError(ValueError):
    """Weights do not fit the requested backbone; the message names the file and mismatch."""


@dataclass
class BackboneConfig:
    name: str = "resnet18"
    in_chans: int = 1
    init: Literal["scratch", "timm", "uscl", "tus"] = "timm"
    weights: str | None = None
    drop_rate: float = 0.0


def create_backbone(config: BackboneConfig) -> nn.Module:
    """Build ``config.name`` with pooled-feature output and the requested initialisation."""
    if config.init == "timm":
        return _create_timm_pretrained(config)
    model = timm.create_model(config.name, pretrained=False, num_classes=0, in_chans=config.in_chans, drop_rate=config.drop_rate)
    if config.init == "scratch":
        if config.weights:
            raise CheckpointError(f"init 'scratch' takes no weights, but weights={config.weights!r} was given")
        return model
    if not config.weights:
        raise CheckpointError(f"init '{config.init}' needs a weights file (backbone.weights=PATH)")
    if config.init == "uscl":
        state = uscl_to_timm_resnet(read_state_dict(config.weights))
    else:
        state = read_tus_encoder(config.weights, config)
    load_backbone_state(model, state, config.weights, in_chans=config.in_chans)
    return model


def _create_timm_pretrained(config: BackboneConfig) -> nn.Module:
    overlay = {"file": str(Path(config.weights).resolve())} if config.weights else None
    if config.weights and not Path(config.weights).is_file():
        raise CheckpointError(f"{config.weights}: pretrained weights file not found")
    try:
        return timm.create_model(
            config.name,
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            num_classes=0,
            in_chans=config.in_chans,
            drop_rate=config.drop_rate,
        )
    except Exception as error:  # timm raises many types (hub, IO, key errors); all mean "no weights"
        source = config.weights or "the model hub"
        raise CheckpointError(
            f"could not load timm pretrained weights for '{config.name}' from {source}: {error}. "
            "Give a local file with backbone.weights=PATH or use backbone.init=scratch."
        ) from error


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict safely (safetensors, or torch.load with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt pickle/zip/safetensors all land here
        raise CheckpointError(f"{path}: not a loadable weights file ({error})") from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


# USCL's ResNet-18 keeps torchvision's children (minus fc) in nn.Sequential `features`.
USCL_FEATURE_INDEX = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def uscl_to_timm_resnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map USCL ``features.<i>.*`` keys to timm ResNet names; drop its heads (l1, l2, fc...)."""
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue
        if len(parts) < 3 or parts[1] not in USCL_FEATURE_INDEX:
            raise CheckpointError(f"unexpected USCL key '{key}'")
        mapped[".".join([USCL_FEATURE_INDEX[parts[1]], *parts[2:]])] = value
    if not mapped:
        raise CheckpointError("no 'features.*' keys found: this is not a USCL state dict")
    return mapped


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path, in_chans: int) -> None:
    """Load ``state`` strictly (every backbone key must be present and shaped right)."""
    first_conv = getattr(model, "pretrained_cfg", {}).get("first_conv")
    if first_conv and f"{first_conv}.weight" in state:
        weight = state[f"{first_conv}.weight"]
        if weight.shape[1] != in_chans:
            state = {**state, f"{first_conv}.weight": adapt_input_conv(in_chans, weight)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or wrong_shape:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if wrong_shape:
            k = wrong_shape[0]
            detail.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise CheckpointError(f"{source}: weights do not fit the backbone: " + "; ".join(detail))
    model.load_state_dict({k: state[k] for k in expected})


def save_encoder(backbone: nn.Module, config: BackboneConfig, path: str | Path, extra: dict | None = None) -> Path:
    """Export an encoder as ``path`` (.safetensors) plus a JSON of its architecture."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(path))
    meta = {"backbone": config.name, "in_chans": config.in_chans, "num_features": int(backbone.num_features), **(extra or {})}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


def read_tus_encoder(path: str | Path, config: BackboneConfig) -> dict[str, torch.Tensor]:
    """Read an exported encoder, refusing one built for another architecture or channel count."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no {meta_path.name} beside it; is this a tus encoder export?")
    meta = json.loads(meta_path.read_text())
    if meta.get("backbone") != config.name:
        raise CheckpointError(f"{path}: encoder is a '{meta.get('backbone')}', but backbone.name is '{config.name}'")
    if meta.get("in_chans") != config.in_chans:
        raise CheckpointError(f"{path}: encoder takes {meta.get('in_chans')} input channel(s), but backbone.in_chans is {config.in_chans}")
    return read_state_dict(path)
