"""Backbones: a timm model by name plus one of several initialisations.

``init`` is one of
- ``scratch``: random init;
- ``timm``: timm's pretrained weights, downloaded by timm, or read from ``weights`` (a local
  file in timm's format: .pth/.bin/.safetensors) so no hub is needed;
- ``uscl``: a USCL state dict (``features.*`` keys of a torchvision ResNet wrapped in
  ``nn.Sequential``; its projection/classifier heads are dropped);
- ``tus``: an encoder exported by ``tus pretrain`` (its folder, or ``<name>.safetensors`` + ``<name>.json``);
- ``mae``: a ViT checkpoint file in Facebook's MAE layout (or a timm ViT state dict).

Pretrained ViTs (``mae`` files and ``tus`` MAE exports) take one path: the ViT is built from this config (a tus
export adds the architecture it recorded) and loaded by :func:`tus.models.vit.load_vit_state` (position
embeddings resized, RGB patch weights summed to 1 channel, a fresh ``fc_norm`` for ``global_pool: avg``), and the
classifier head built by :func:`create_head` gets MAE's init; so both arms fine-tune identical heads.

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
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tus.models.configs import BackboneConfig as BackboneConfig
from tus.models.export import classifier_normalization, load_export, read_export_config, save_export
from tus.models.vit import VIT_BUILDER, create_vit_encoder, init_mae_head, is_vit_export, load_vit_state, vit_export_kwargs
from tus.models.weights import CheckpointError, check_weight_values, read_state_dict

__all__ = ["BackboneConfig", "CheckpointError", "create_backbone", "create_head", "read_state_dict", "read_tus_encoder", "save_encoder"]

# How an encoder export's architecture is rebuilt: timm.create_model(name, num_classes=0, in_chans=...) for CNNs,
# tus.models.vit.create_vit_encoder(name, **kwargs) (VIT_BUILDER) for the ViTs of MAE pretraining.
TIMM_BUILDER = "timm.create_model"


def architecture(name: str) -> str:
    """A timm model name without its pretrained tag (``resnet18.tv_in1k`` -> ``resnet18``):
    the weights' recipe differs, the architecture does not."""
    return name.split(".", 1)[0]


def create_backbone(config: BackboneConfig) -> nn.Module:
    """Build ``config.name`` with pooled-feature output and the requested initialisation."""
    if config.init == "timm":
        return _create_timm_pretrained(config)
    if config.init == "mae" and not config.weights:
        raise CheckpointError("init 'mae' needs a checkpoint file (backbone.weights=PATH)")
    if config.init in ("tus", "mae") and config.weights:
        vit = _create_pretrained_vit(config)
        if vit is not None:
            return vit
    model = timm.create_model(
        config.name,
        pretrained=False,
        num_classes=0,
        in_chans=config.in_chans,
        drop_rate=config.drop_rate,
        **config.timm_kwargs(),
    )
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


def _create_pretrained_vit(config: BackboneConfig) -> VisionTransformer | None:
    """The one path of pretrained ViTs (``init=mae`` checkpoint files and ``init=tus`` MAE exports); None when
    ``config`` is an ``init=tus`` export of a CNN.

    The ViT is built by :func:`tus.models.vit.create_vit_encoder` from this config (a tus export first adds the
    architecture it recorded, :func:`tus.models.vit.vit_export_kwargs`; the config's options win) and loaded by
    :func:`tus.models.vit.load_vit_state`, so the head (``global_pool``, a fresh ``fc_norm`` for ``avg``) depends on
    the config only, never on where the weights came from.
    """
    assert config.weights is not None
    recorded: dict = {}
    if config.init == "tus":
        meta, state = load_export(config.weights, "encoder")
        if not is_vit_export(meta):
            return None
        name = meta["architecture"]["name"]
        if architecture(name) != architecture(config.name):
            raise CheckpointError(f"{config.weights}: encoder is a '{name}', but backbone.name is '{config.name}'")
        recorded = vit_export_kwargs(meta)
    else:
        state = read_state_dict(config.weights)
    kwargs = {**recorded, "in_chans": config.in_chans, "drop_rate": config.drop_rate, **config.timm_kwargs()}
    try:
        model = create_vit_encoder(config.name, **kwargs)
    except TypeError as error:  # create_vit_encoder refuses a model that is not a timm VisionTransformer
        raise CheckpointError(f"init '{config.init}' needs a timm ViT: {error}") from error
    load_vit_state(model, state, config.weights)
    return model


def create_head(backbone: nn.Module, config: BackboneConfig, num_classes: int) -> nn.Linear:
    """The linear classifier on the backbone's pooled features, initialised as ``config.head_init`` says."""
    head = nn.Linear(int(backbone.num_features), num_classes)
    if resolve_head_init(config, backbone) == "mae":
        init_mae_head(head)
    return head


def resolve_head_init(config: BackboneConfig, backbone: nn.Module) -> str:
    """``config.head_init`` with ``auto`` resolved: ``mae`` for a ViT loaded from MAE weights, else ``pytorch``."""
    if config.head_init != "auto":
        return config.head_init
    return "mae" if isinstance(backbone, VisionTransformer) and config.init in ("mae", "tus") else "pytorch"


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
