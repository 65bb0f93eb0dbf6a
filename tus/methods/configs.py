"""The fine-tuning optimiser config, without importing torch or Lightning: the CLI builds and
prints configs from it before any model code loads. :mod:`tus.methods.classifier` re-exports it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

FINETUNE_SCHEDULES = ("constant", "cosine", "onecycle")


@dataclass
class FineTuneOptimConfig:
    """AdamW with separate learning rates for the pretrained backbone and the new head.

    ``backbone_lr_scale``: when set, the backbone's rate is ``lr_head * backbone_lr_scale`` and
    ``lr_backbone`` is ignored. ``weight_decay`` is AdamW's (decoupled) decay on every
    parameter; the reference code fine-tunes with 1e-5.

    ``schedule`` (per optimiser step): ``constant`` (the reference: no scheduler), ``cosine``
    (cosine decay to 0) or ``onecycle`` (``torch.optim.lr_scheduler.OneCycleLR``, learning rate
    only: momentum is not cycled). Warmup is ``warmup_epochs`` epochs or a ``warmup_fraction``
    of all steps (give at most one), linear from ~0 to the peak; ``onecycle`` uses it as its
    rising phase (``pct_start``), 0.3 of the steps (torch's default) when neither is given.

    ``layer_decay`` (ViT backbones only; None = off): layer-wise learning-rate decay as in MAE/BEiT fine-tuning
    (He et al. 2022, Appendix A.1; 0.65-0.75 there). The head and the final norm train at ``lr_head``, block
    ``i`` of ``n`` at ``lr_head * layer_decay ** (n - i)``, the patch and position embeddings at
    ``lr_head * layer_decay ** (n + 1)`` (:func:`tus.models.vit.layerwise_lr_decay_groups`); ``lr_backbone`` and
    ``backbone_lr_scale`` are then unused, and norms, biases, tokens and position embeddings get no weight decay.
    Every schedule scales each group's own learning rate, so warmup and decay keep the per-layer ratios.
    """

    lr_backbone: float = 1e-5
    lr_head: float = 1e-4
    weight_decay: float = 0.01
    backbone_lr_scale: float | None = None
    schedule: Literal["constant", "cosine", "onecycle"] = "constant"
    warmup_epochs: float = 0.0
    warmup_fraction: float | None = None
    layer_decay: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in FINETUNE_SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {', '.join(FINETUNE_SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_epochs < 0 or (self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1):
            raise ValueError(f"need warmup_epochs >= 0 and 0 <= warmup_fraction < 1, got {self.warmup_epochs}, {self.warmup_fraction}")
        if self.warmup_epochs and self.warmup_fraction:
            raise ValueError("give optim.warmup_epochs or optim.warmup_fraction, not both")
        if self.backbone_lr_scale is not None and self.backbone_lr_scale < 0:
            raise ValueError(f"optim.backbone_lr_scale must be >= 0, got {self.backbone_lr_scale}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")

    @property
    def backbone_lr(self) -> float:
        return self.lr_head * self.backbone_lr_scale if self.backbone_lr_scale is not None else self.lr_backbone

    def warmup_steps(self, total_steps: int, steps_per_epoch: float) -> int:
        """Warmup length in optimiser steps (rounded up, so a requested warmup is never empty)."""
        if self.warmup_fraction:
            return min(total_steps, math.ceil(self.warmup_fraction * total_steps))
        return min(total_steps, math.ceil(self.warmup_epochs * steps_per_epoch))
