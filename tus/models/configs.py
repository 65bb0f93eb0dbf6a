"""The backbone config of fine-tuning, without importing torch or timm: the CLI builds and prints
configs from it before any model code loads. :mod:`tus.models.backbones` re-exports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class BackboneConfig:
    name: str = "resnet18"
    in_chans: int = 1
    init: Literal["scratch", "timm", "uscl", "tus", "mae"] = "timm"
    weights: str | None = None
    drop_rate: float = 0.0
    # Architecture options handed to timm only when set (None keeps the model's default; DenseNets take no
    # drop_path_rate). ViTs: stochastic depth, ``token`` (class token) or ``avg`` (mean of patch tokens, then a
    # fresh fc_norm, as MAE's fine-tuning) head pooling, input size and patch size (e.g. 64 px with 8 px patches on CPU).
    drop_path_rate: float | None = None
    global_pool: str | None = None
    img_size: int | None = None
    patch_size: int | None = None
    # The classifier head's init (tus.models.backbones.create_head): ``mae`` is MAE's main_finetune.py (weight
    # trunc_normal_(std=2e-5), bias 0); ``pytorch`` is nn.Linear's default; ``auto`` is ``mae`` for a ViT
    # loaded from MAE weights (init mae or tus) and ``pytorch`` otherwise.
    head_init: Literal["auto", "pytorch", "mae"] = "auto"

    def timm_kwargs(self) -> dict:
        """The optional architecture options that are set, as ``timm.create_model`` keyword arguments."""
        options = {"drop_path_rate": self.drop_path_rate, "global_pool": self.global_pool, "img_size": self.img_size, "patch_size": self.patch_size}
        return {key: value for key, value in options.items() if value is not None}
