"""Backbones: a timm model by name plus one of several initialisations.

``init`` is one of
- ``scratch``: random init;
- ``timm``: timm's pretrained weights, downloaded by timm, or read from ``weights`` (a local
  file in timm's format: .pth/.bin/.safetensors) so no hub is needed;
- ``uscl``: a USCL state dict (``features.*`` keys of a torchvision ResNet wrapped in
  ``nn.Sequential``; its projection/classifier heads are dropped);
- ``tus``: an encoder exported by ``tus pretrain`` (``<name>.safetensors`` + ``<name>.json``);
- ``mae``: a ViT checkpoint file in Facebook's MAE layout (or a timm ViT state dict), loaded by
  :func:`tus.models.vit.load_vit_weights` (position embeddings resized, RGB patch weights summed to 1 channel).

Every weights file is read by :func:`tus.models.weights.load_weights` (TorchScript, safetensors or
``torch.load(weights_only=True)``; nothing in a file can run code), also timm's local files, whose
loaded state is handed to timm instead of the path.

The backbone always returns pooled features (``num_classes=0``). Pretrained first convs are
adapted to ``in_chans`` (1 for ultrasound) by timm's channel summing. Whenever weights were
asked for and cannot be loaded, this raises: there is no silent fallback to random weights.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from timm.models import adapt_input_conv
from torch import nn

from tus.models.configs import BackboneConfig as BackboneConfig
from tus.models.export import classifier_normalization, load_export, read_export_config, save_export
from tus.models.weights import CheckpointError, check_weight_values, load_weights

__all__ = ["BackboneConfig", "CheckpointError", "create_backbone", "read_state_dict", "read_tus_encoder", "save_encoder"]

# How an encoder export's architecture is rebuilt: timm.create_model(name, num_classes=0, in_chans=...) for CNNs,
# tus.models.vit.create_vit_encoder(name, **kwargs) for the ViTs of MAE pretraining.
TIMM_BUILDER = "timm.create_model"
VIT_BUILDER = "tus.models.vit.create_vit_encoder"


def architecture(name: str) -> str:
    """A timm model name without its pretrained tag (``resnet18.tv_in1k`` -> ``resnet18``):
    the weights' recipe differs, the architecture does not."""
    return name.split(".", 1)[0]


def create_backbone(config: BackboneConfig) -> nn.Module:
    """Build ``config.name`` with pooled-feature output and the requested initialisation."""
    if config.init == "timm":
        return _create_timm_pretrained(config)
    if config.init == "tus" and config.weights:
        _, meta = read_tus_encoder_meta(config.weights)
        if is_vit_export(meta):  # a ViT exported by MAE pretraining: rebuilt from its own config
            name = meta["architecture"]["name"]
            if architecture(name) != architecture(config.name):
                raise CheckpointError(f"{config.weights}: encoder is a '{name}', but backbone.name is '{config.name}'")
            from tus.models.vit import create_vit_from_export  # lazy: vit imports this module

            return create_vit_from_export(config.weights, in_chans=config.in_chans, drop_rate=config.drop_rate, **config.timm_kwargs())
    model = timm.create_model(
        config.name,
        pretrained=False,
        num_classes=0,
        in_chans=config.in_chans,
        drop_rate=config.drop_rate,
        **config.timm_kwargs(),
    )
    if config.init == "mae":
        # A Facebook-MAE (or timm ViT) checkpoint file, mapped onto the ViT built from this config.
        if not config.weights:
            raise CheckpointError("init 'mae' needs a checkpoint file (backbone.weights=PATH)")
        from timm.models.vision_transformer import VisionTransformer

        from tus.models.vit import load_vit_weights  # lazy: vit imports this module

        if not isinstance(model, VisionTransformer):
            raise CheckpointError(f"init 'mae' needs a timm ViT, but '{config.name}' is a {type(model).__name__}")
        load_vit_weights(model, config.weights)
        return model
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
    # timm would read a local file itself; it gets the safely loaded state instead of the path.
    overlay = {"state_dict": read_state_dict(config.weights)} if config.weights else None
    try:
        return timm.create_model(
            config.name,
            pretrained=True,
            pretrained_cfg_overlay=overlay,
            num_classes=0,
            in_chans=config.in_chans,
            drop_rate=config.drop_rate,
            **config.timm_kwargs(),
        )
    except Exception as error:  # timm raises many types (hub, IO, key errors); all mean "no weights"
        source = config.weights or "the model hub"
        raise CheckpointError(
            f"could not load timm pretrained weights for '{config.name}' from {source}: {error}. Give a local file with backbone.weights=PATH or use backbone.init=scratch."
        ) from error


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict safely with :func:`~tus.models.weights.load_weights` (a TorchScript file gives its
    module's state dict); Lightning/timm wrappers (``state_dict``, ``model``) and DDP's ``module.`` are removed."""
    path = Path(path)
    state = load_weights(path)
    if isinstance(state, torch.jit.ScriptModule):
        state = dict(state.state_dict())
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    tensors = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys {sorted(map(str, state))[:5]}), not a state dict")
    return tensors


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
    check_weight_values(state, expected, source)
    model.load_state_dict({k: state[k] for k in expected})


def save_encoder(backbone: nn.Module, config: BackboneConfig, path: str | Path, extra: dict | None = None) -> Path:
    """Export an encoder as the folder ``path`` (``model.safetensors`` + ``config.json``, :mod:`tus.models.export`).

    ``extra`` adds keys: ``vit`` (the :func:`tus.models.vit.create_vit_encoder` arguments of a ViT) becomes the
    architecture's kwargs, ``image_size`` the training resolution; the rest (``organ_classes``, ``steps``,
    ``pretrain_run``, ``method``...) is kept as given. A ``path`` ending in ``.safetensors`` names the folder
    without that suffix. Returns the folder.
    """
    path = Path(path)
    folder = path.with_suffix("") if path.suffix == ".safetensors" else path
    extra = dict(extra or {})
    vit = extra.pop("vit", None)
    if vit:
        architecture = {"library": "timm", "builder": VIT_BUILDER, "name": config.name, "kwargs": {k: v for k, v in vit.items() if k != "name"}}
    else:
        architecture = {"library": "timm", "builder": TIMM_BUILDER, "name": config.name, "kwargs": {"num_classes": 0}}
    export = {
        "architecture": architecture,
        "in_chans": config.in_chans,
        "image_size": extra.pop("image_size", None),
        "normalization": classifier_normalization(config.in_chans),
        "num_features": int(backbone.num_features),
        **extra,
    }
    return save_export(folder, "encoder", backbone, export)


def read_tus_encoder_meta(path: str | Path) -> tuple[Path, dict]:
    """(weights file, config) of an encoder export given as its folder, ``config.json`` or ``model.safetensors``,
    or an old ``NAME.safetensors`` + ``NAME.json`` export (config converted, see :mod:`tus.models.export`).

    Refuses a missing weights file or config (naming the one that is missing) and an export of another
    kind (a diffusion U-Net or a fine-tuned classifier), saying which kind it is.
    """
    return read_export_config(path, "encoder")


def is_vit_export(meta: dict) -> bool:
    """Whether an encoder export's config describes a ViT rebuilt by :func:`tus.models.vit.create_vit_from_export`."""
    architecture = meta["architecture"]
    return architecture.get("builder") == VIT_BUILDER or (meta.get("format_version") == 0 and bool(architecture.get("kwargs")))


def read_tus_encoder(path: str | Path, config: BackboneConfig) -> dict[str, torch.Tensor]:
    """Read an exported encoder, refusing one built for another architecture or channel count.

    The channel count is checked on the first convolution's tensor, not only in the config: a file whose
    config claims 1 channel but whose weights take 3 would otherwise be summed to 1 channel silently.
    """
    meta, state = load_export(path, "encoder")
    weights = Path(path)
    name = meta["architecture"]["name"]
    if architecture(name) != architecture(config.name):
        raise CheckpointError(f"{weights}: encoder is a '{name}', but backbone.name is '{config.name}'")
    if meta.get("in_chans") != config.in_chans:
        raise CheckpointError(f"{weights}: encoder takes {meta.get('in_chans')} input channel(s), but backbone.in_chans is {config.in_chans}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    first_conv = timm.models.get_pretrained_cfg_value(config.name, "first_conv") if timm.is_model(config.name) else None
    for tensor_name in ([f"{first_conv}.weight"] if first_conv else []) + ["patch_embed.proj.weight"]:
        tensor = state.get(tensor_name)
        if tensor is not None and tensor.ndim == 4 and tensor.shape[1] != meta["in_chans"]:
            raise CheckpointError(f"{weights}: its config says in_chans={meta['in_chans']}, but the weights' {tensor_name} takes {tensor.shape[1]} channel(s); the export is inconsistent")
    return state
