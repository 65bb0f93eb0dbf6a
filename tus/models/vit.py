"""Vision Transformers for ultrasound: building the timm encoder, loading external ViT/MAE weights into it, the
classifier head MAE fine-tunes, and the optimiser parameter groups of MAE pretraining and fine-tuning (He et al.
2022, "Masked Autoencoders Are Scalable Vision Learners", Appendix A; facebookresearch/mae).

- :func:`create_vit_encoder`: a timm ``VisionTransformer`` without classifier, any image size divisible by the
  patch size, patch size overridable.
- :func:`interpolate_pos_embed`: plain bicubic resize of the position-embedding grid (MAE's
  ``util/pos_embed.interpolate_pos_embed``: no antialiasing), prefix (class) tokens untouched.
- :func:`mae_checkpoint_to_timm` / :func:`load_vit_state` / :func:`load_vit_weights`: Facebook-MAE checkpoints
  (``{"model": ...}`` with decoder keys and ``mask_token``), timm ViT state dicts and tus MAE exports, mapped onto a
  (1-channel) timm ViT. Anything that does not fit raises :class:`~tus.models.weights.CheckpointError`; there is
  no fallback to random weights.
- :func:`vit_export_kwargs` / :func:`is_vit_export`: what a tus MAE export records about its ViT.
- :func:`init_mae_head`: MAE's fine-tuning head init (``trunc_normal_(std=2e-5)``, zero bias).
- :func:`layerwise_lr_decay_groups`: fine-tuning with layer-wise lr decay (the reference ``param_groups_lrd``).
- :func:`mae_param_groups`: pretraining AdamW groups as MAE's ``main_pretrain.py`` builds them.

This module sits below :mod:`tus.models.backbones` (which builds a backbone from a config and imports this one),
so it never imports it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import timm
import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models import adapt_input_conv
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay
from torch import nn

from tus.models.export import load_export
from tus.models.weights import CheckpointError, check_weight_values, read_state_dict

# How an encoder export's ViT is rebuilt: tus.models.vit.create_vit_encoder(name, **kwargs).
VIT_BUILDER = "tus.models.vit.create_vit_encoder"
# Keyword arguments of an export's architecture that choose the fine-tuning head, not the encoder: older MAE
# exports recorded ``fc_norm: False`` (a pretraining-time requirement), which would have kept the pretrained
# final norm before average pooling instead of MAE's fresh ``fc_norm`` after it.
HEAD_CHOICE_KWARGS = ("fc_norm",)
# MAE's fine-tuning head: trunc_normal_(head.weight, std=2e-5) (main_finetune.py), bias 0.
MAE_HEAD_INIT_STD = 2e-5
# Keys of a Facebook-MAE pretraining checkpoint that belong to the decoder, not to the encoder.
MAE_DECODER_PREFIXES = ("decoder_", "mask_token")


def create_vit_encoder(
    name: str,
    img_size: int | tuple[int, int] = 224,
    patch_size: int | None = None,
    in_chans: int = 1,
    global_pool: str = "token",
    **kwargs: object,
) -> VisionTransformer:
    """A timm ViT ``name`` with random weights and no classifier (``num_classes=0``).

    ``patch_size`` overrides the one in the name (e.g. 8 for 64-px images); ``kwargs`` go to timm (``depth``,
    ``fc_norm``, ``drop_path_rate``...).
    """
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    model = timm.create_model(name, pretrained=False, img_size=img_size, in_chans=in_chans, num_classes=0, global_pool=global_pool, **kwargs)
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"'{name}' is a {type(model).__name__}, not a timm VisionTransformer")
    return model


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    new_grid_hw: tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid_hw: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Resize the patch part of ``pos_embed`` (1, prefix + h*w, D) to ``new_grid_hw`` bicubically.

    The kernel is MAE's (``util/pos_embed.interpolate_pos_embed``): ``F.interpolate(mode="bicubic",
    align_corners=False)`` without antialiasing (timm's default antialiases, 2-10 % off MAE's numbers when a
    224-px grid is shrunk). The prefix (class) tokens are kept as they are; at the original size the input is
    returned unchanged. ``old_grid_hw`` defaults to a square grid.
    """
    if old_grid_hw is None:
        side = math.isqrt(pos_embed.shape[1] - num_prefix_tokens)
        if side * side != pos_embed.shape[1] - num_prefix_tokens:
            raise ValueError(f"pos_embed of {pos_embed.shape[1]} tokens is not a square grid; give old_grid_hw")
        old_grid_hw = (side, side)
    return resample_abs_pos_embed(
        pos_embed,
        new_size=list(new_grid_hw),
        old_size=list(old_grid_hw),
        num_prefix_tokens=num_prefix_tokens,
        interpolation="bicubic",
        antialias=False,
    )


def _unwrap(state: dict) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, unwrapped from ``{"model": ...}`` and without DDP's ``module.`` prefix."""
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def checkpoint_layout(state: dict) -> Literal["mae", "timm"]:
    """``mae`` for a Facebook-MAE pretraining checkpoint (decoder keys present), ``timm`` for an encoder-only ViT."""
    state = _unwrap(state)
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"not a ViT state dict: no 'patch_embed.proj.weight' among keys {sorted(state)[:5]}...")
    return "mae" if any(k.startswith(MAE_DECODER_PREFIXES) for k in state) else "timm"


def _reduce_channels(weight: torch.Tensor, in_chans: int, channel_reduce: str) -> torch.Tensor:
    """Adapt a patch projection (D, C, p, p) to ``in_chans``; RGB -> grey by summing (timm's rule) or averaging."""
    if weight.shape[1] == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True) if channel_reduce == "sum" else weight.mean(dim=1, keepdim=True)
    return adapt_input_conv(in_chans, weight)


def mae_checkpoint_to_timm(
    state: dict,
    model: VisionTransformer,
    channel_reduce: Literal["sum", "mean"] = "sum",
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Map a Facebook-MAE or timm ViT state dict onto ``model``; the result loads with ``strict=True`` (no head).

    Decoder keys, ``mask_token`` and classifier heads are dropped; ``pos_embed`` is resized to the model's patch
    grid (:func:`interpolate_pos_embed`); a 3-channel patch projection is summed or averaged to the model's
    ``in_chans``. A model with global-average pooling (``fc_norm``, no final ``norm``) loaded from a pretraining
    checkpoint (final ``norm``, no ``fc_norm``) gets a fresh ``fc_norm`` (LayerNorm's own init: weight 1, bias 0)
    and the pretrained final norm is dropped, as MAE's ``main_finetune.py`` does (``models_vit.py``
    ``global_pool=True`` deletes ``norm``; the missing ``fc_norm`` keys stay at their init). Missing, unexpected or mis-shaped keys raise :class:`CheckpointError` naming ``source`` and the keys.
    """
    if channel_reduce not in ("sum", "mean"):
        raise ValueError(f"channel_reduce must be 'sum' or 'mean', got {channel_reduce!r}")
    layout = checkpoint_layout(state)
    state = {k: v for k, v in _unwrap(state).items() if not k.startswith((*MAE_DECODER_PREFIXES, "head."))}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}

    weight = state["patch_embed.proj.weight"]
    if weight.ndim == 4:
        state["patch_embed.proj.weight"] = _reduce_channels(weight, model.patch_embed.proj.in_channels, channel_reduce)
    if "pos_embed" in state and state["pos_embed"].ndim == 3:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        num_patches = state["pos_embed"].shape[1] - prefix
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise CheckpointError(f"{source}: pos_embed has {num_patches} patch positions, not a square grid")
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], tuple(model.patch_embed.grid_size), prefix, old_grid_hw=(side, side))
    fresh_fc_norm = "fc_norm.weight" in expected and "fc_norm.weight" not in state and "norm.weight" not in expected
    if fresh_fc_norm and "norm.weight" in state:
        state.pop("norm.weight")
        state.pop("norm.bias", None)
        state["fc_norm.weight"] = torch.ones_like(expected["fc_norm.weight"])
        state["fc_norm.bias"] = torch.zeros_like(expected["fc_norm.bias"])

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        if wrong_shape:
            k = wrong_shape[0]
            detail.append(f"{len(wrong_shape)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}")
        raise CheckpointError(f"{source} ({layout} layout): weights do not fit the ViT: " + "; ".join(detail))
    check_weight_values(state, expected, source)
    return {k: state[k].to(expected[k].dtype) for k in expected}


def load_vit_state(model: VisionTransformer, state: dict, source: str | Path, channel_reduce: Literal["sum", "mean"] = "sum") -> Literal["mae", "timm"]:
    """Load a ViT state dict (Facebook-MAE, timm or a tus MAE export's) into ``model``, head excluded, and return its
    layout. The one loading path of every pretrained ViT: ``init=mae`` files and ``init=tus`` exports both come here.
    """
    layout = checkpoint_layout(state)
    mapped = mae_checkpoint_to_timm(state, model, channel_reduce=channel_reduce, source=str(source))
    # Only the classifier head (absent from the mapping by design) may stay at its own initialisation.
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise CheckpointError(f"{source}: could not load keys {missing or unexpected}")
    return layout


def load_vit_weights(model: VisionTransformer, path: str | Path, channel_reduce: Literal["sum", "mean"] = "sum") -> Literal["mae", "timm"]:
    """Load a local ViT weights file into ``model`` (head excluded) and return the layout it had.

    The file is read by :func:`tus.models.weights.read_state_dict`: safetensors, TorchScript or
    ``torch.load(weights_only=True)``, never a pickle that could run code. Both Facebook-MAE checkpoints and timm
    ViT state dicts are mapped by :func:`mae_checkpoint_to_timm`.
    """
    return load_vit_state(model, read_state_dict(path), path, channel_reduce=channel_reduce)


def init_mae_head(head: nn.Linear) -> nn.Linear:
    """MAE's fine-tuning head: ``trunc_normal_(head.weight, std=2e-5)`` (``main_finetune.py``) and a zero bias
    (timm's ``_init_weights`` of the reference's ViT). A near-zero head starts every logit at ~0, so the first
    steps move the pretrained encoder by the loss of a uniform guess, not by a random linear map's."""
    trunc_normal_(head.weight, std=MAE_HEAD_INIT_STD)
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    return head


def _vit_layer_id(name: str, num_blocks: int) -> int:
    """Layer of a ViT parameter for lr decay: embeddings 0, block i -> i + 1, final norm/head num_blocks + 1."""
    if name in ("cls_token", "reg_token", "pos_embed") or name.startswith(("patch_embed", "norm_pre")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def layerwise_lr_decay_groups(
    model: VisionTransformer,
    head: nn.Module | None,
    base_lr: float,
    weight_decay: float,
    layer_decay: float = 0.75,
) -> list[dict]:
    """Parameter groups for fine-tuning with layer-wise lr decay (He et al. 2022, Appendix A.1; BEiT), as MAE's
    ``util/lr_decay.param_groups_lrd``.

    Not timm's ``param_groups_layer_decay``: timm groups the final norm with the last block and so has one layer
    fewer, which scales every layer below the head by one more factor ``layer_decay`` than the reference
    (``tests/models/test_vit_loading.py`` shows the difference).

    With ``n`` blocks, layer ids are 0 for the patch embedding, class token and position embedding, ``i + 1`` for
    block ``i`` and ``n + 1`` for the final norm and the ``head``; each group's lr is
    ``base_lr * layer_decay ** (n + 1 - layer_id)``. 1-D parameters, biases, tokens and position embeddings get no
    weight decay. Each group carries ``name`` (``layer_<id>_decay``/``layer_<id>_no_decay``), ``params``, ``lr``
    (already scaled), ``lr_scale`` and ``weight_decay``; a scheduler that sets lrs itself must multiply its lr by
    ``lr_scale``.
    """
    num_blocks = len(model.blocks)
    named = [(name, param, _vit_layer_id(name, num_blocks)) for name, param in model.named_parameters()]
    if head is not None:
        seen = {id(param) for _, param, _ in named}
        named += [(f"head.{name}", param, num_blocks + 1) for name, param in head.named_parameters() if id(param) not in seen]
    no_decay_names = model.no_weight_decay()
    groups: dict[str, dict] = {}
    for name, param, layer_id in named:
        if not param.requires_grad:
            continue
        decay = not (param.ndim == 1 or name.endswith(".bias") or name in no_decay_names)
        group_name = f"layer_{layer_id}_{'decay' if decay else 'no_decay'}"
        if group_name not in groups:
            scale = layer_decay ** (num_blocks + 1 - layer_id)
            groups[group_name] = {
                "name": group_name,
                "params": [],
                "lr": base_lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[group_name]["params"].append(param)
    return list(groups.values())


def mae_param_groups(model: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """AdamW groups for MAE pretraining, as MAE's ``main_pretrain.py`` builds them (timm's weight-decay groups with
    no skip list): no weight decay on 1-D parameters (norms) and biases; the class and mask tokens ARE decayed.

    Frozen parameters (the fixed sin-cos position embeddings) are left out. Groups are named ``decay``/``no_decay``.
    """
    groups = param_groups_weight_decay(model, weight_decay)
    for group in groups:
        group["name"] = "decay" if group["weight_decay"] else "no_decay"
    return groups


def is_vit_export(meta: dict) -> bool:
    """Whether an encoder export's config describes a ViT rebuilt by :func:`create_vit_encoder`."""
    architecture = meta["architecture"]
    return architecture.get("builder") == VIT_BUILDER or (meta.get("format_version") == 0 and bool(architecture.get("kwargs")))


def vit_export_kwargs(meta: dict) -> dict:
    """The :func:`create_vit_encoder` keyword arguments of an encoder export's ViT, without the head choices
    (:data:`HEAD_CHOICE_KWARGS`): with those gone, ``global_pool`` alone decides the head as in timm and MAE
    (``avg``: mean of the patch tokens, then a fresh ``fc_norm``; ``token``: final norm, class token)."""
    return {k: v for k, v in meta["architecture"]["kwargs"].items() if k not in HEAD_CHOICE_KWARGS}


def create_vit_from_export(path: str | Path, **overrides: object) -> VisionTransformer:
    """Rebuild the timm ViT of a tus encoder export (its folder, ``config.json`` or ``model.safetensors``, or an old
    ``NAME.safetensors`` + ``NAME.json``) and load its weights.

    The config's ``architecture`` holds the timm ``name`` and the :func:`create_vit_encoder` keyword arguments written
    by MAE pretraining (``img_size``, ``patch_size``, ``in_chans``, ``global_pool``...; :func:`vit_export_kwargs`).
    ``overrides`` change or add arguments (``global_pool="avg"``, ``drop_path_rate``...); the weights then load
    through :func:`load_vit_state`, the path of every pretrained ViT, which refuses anything that does not fit.
    Fine-tuning builds its ViT through :func:`tus.models.backbones.create_backbone` (``init=tus``), which does the same.
    """
    meta, state = load_export(path, "encoder")
    if not is_vit_export(meta):
        raise CheckpointError(f"{path}: the encoder export is a '{meta['architecture']['name']}', not a ViT export")
    model = create_vit_encoder(name=meta["architecture"]["name"], **{**vit_export_kwargs(meta), **overrides})
    load_vit_state(model, state, path)
    return model
