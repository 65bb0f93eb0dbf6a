"""What the pretraining stage needs of a pretraining method (the contract of the registry).

A method is a LightningModule with
- ``Config``: a dataclass of its options (the ``method:`` block of a pretraining config, minus
  ``name``), checked strictly like every config;
- ``train_transform(config, data, seed)``: the per-image transform of the pool (two augmented
  views for contrastive methods, one resized image for masked autoencoders); the pool yields
  ``{"image": <the transform's output, batched>, "organ": ..., ...}`` to ``training_step``;
- ``encoder``: the module exported for fine-tuning (images -> pooled features), also what the
  organ/downstream probes embed with;
- ``export_encoder(path, extra)``: writes the encoder in the project's export format.
The stage constructs it as ``cls(config, num_organs=..., batch_size=...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning as L
from torch import nn

from tus.data.pools import PretrainDataConfig


class PretrainingMethod(L.LightningModule):
    """Base class of pretraining methods (see the module docstring for the contract)."""

    Config: ClassVar[type]
    encoder: nn.Module

    @classmethod
    def train_transform(cls, config: Any, data: PretrainDataConfig, seed: int) -> Any:
        raise NotImplementedError

    def export_encoder(self, path: Path, extra: dict) -> None:
        raise NotImplementedError
