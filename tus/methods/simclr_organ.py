"""Organ-supervised contrastive pretraining: SimCLR's NT-Xent plus an organ cross-entropy.

Encoder f (a timm backbone), projection head g and organ head h; for the two views of each
image (TesticulUS, Sec. 4.1, Eq. 1-4)::

    L = contrastive_weight * L_con(g(f(x1)), g(f(x2))) + organ_weight * L_sup(h(f(x1,2)), organ)

``contrastive_weight=1, organ_weight=0.2`` is the paper's lambda = 0.2; ``organ_weight=0`` is
contrastive-only and ``contrastive_weight=0, organ_weight=1`` supervised-only (Tab. 4). A head
whose weight is 0 is frozen and its loss is only logged, so it gets no gradient, no update and
no weight decay, and DDP sees no unused trainable parameter.

Under DDP the NT-Xent negatives come from every rank (lightly's ``gather_distributed``), and the
loss/gradient equal those of one process seeing the global batch (see ``nt_xent_loss``).
:class:`OrganProbe` measures the representation on held-out images while training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from lightly.models.modules import SimCLRProjectionHead
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tus.config import to_dict
from tus.data.pools import PretrainDataConfig
from tus.data.views import ViewPairTransform
from tus.losses.contrastive import nt_xent_loss, organ_accuracy, organ_ce_loss
from tus.methods.base import PretrainingMethod
from tus.models.backbones import BackboneConfig, create_backbone, save_encoder
from tus.optim import LarsConfig, ScheduleConfig, build_lars, scaled_lr, schedule_lambda


@dataclass
class PretrainModelConfig:
    """Encoder plus heads. ``projection_*`` shape g (SimCLR's MLP); h is one linear layer."""

    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(init="scratch"))
    projection_hidden_dim: int = 512
    projection_output_dim: int = 128
    projection_layers: int = 2
    projection_batch_norm: bool = True


@dataclass
class PretrainLossConfig:
    """Loss weights (lambda = ``organ_weight`` / ``contrastive_weight``) and NT-Xent temperature."""

    contrastive_weight: float = 1.0
    organ_weight: float = 0.2
    temperature: float = 0.2
    gather_distributed: bool = True
    # The organ CE over the two views: "mean" (lambda as written in the paper) or "sum" (the
    # authors' code adds the two views' losses, doubling lambda's effect).
    organ_views: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        if self.contrastive_weight < 0 or self.organ_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if self.contrastive_weight == 0 and self.organ_weight == 0:
            raise ValueError("at least one of loss.contrastive_weight and loss.organ_weight must be > 0")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")


@dataclass
class SimCLROrganConfig:
    """The ``method:`` block of ``method.name: simclr_organ``."""

    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    loss: PretrainLossConfig = field(default_factory=PretrainLossConfig)
    optimizer: LarsConfig = field(default_factory=LarsConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


class SimCLROrgan(PretrainingMethod):
    """f, g, h trained with ``L_con + lambda * L_sup``, LARS and a warmup + decay schedule.

    ``batch_size`` is per device; the learning rate is ``optimizer.lr_per_256`` scaled by the
    global batch (batch_size x world_size x accumulate_grad_batches). The schedule spans
    ``trainer.max_steps`` optimizer steps.
    """

    Config = SimCLROrganConfig

    def __init__(self, config: SimCLROrganConfig, *, num_organs: int, batch_size: int):
        super().__init__()
        model, loss, optimizer, schedule = config.model, config.loss, config.optimizer, config.schedule
        self.save_hyperparameters(
            {
                "model": to_dict(model),
                "loss": to_dict(loss),
                "optimizer": to_dict(optimizer),
                "schedule": to_dict(schedule),
                "num_organs": num_organs,
                "batch_size": batch_size,
            }
        )
        self.model_config = model
        self.loss_config = loss
        self.optimizer_config = optimizer
        self.schedule_config = schedule
        self.batch_size = batch_size
        self.encoder = create_backbone(model.backbone)
        width = self.encoder.num_features
        self.projection_head = SimCLRProjectionHead(
            input_dim=width,
            hidden_dim=model.projection_hidden_dim,
            output_dim=model.projection_output_dim,
            num_layers=model.projection_layers,
            batch_norm=model.projection_batch_norm,
        )
        # A pool without organ labels keeps a one-class head (frozen, organ_weight must be 0)
        # so every export and checkpoint has the same layout.
        self.organ_head = nn.Linear(width, max(num_organs, 1))
        self.projection_head.requires_grad_(loss.contrastive_weight > 0)
        self.organ_head.requires_grad_(loss.organ_weight > 0)

    @classmethod
    def train_transform(cls, config: SimCLROrganConfig, data: PretrainDataConfig, seed: int) -> ViewPairTransform:
        """Two independently augmented views per image (SimCLR)."""
        return ViewPairTransform(data.views, data.image_size, seed=seed)

    def export_encoder(self, path: Path, extra: dict) -> None:
        save_encoder(self.encoder, self.model_config.backbone, path, extra=extra)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder features f(x) (what is exported and fine-tuned)."""
        return self.encoder(images)

    def compute_losses(self, views: list[torch.Tensor], organs: torch.Tensor) -> dict[str, torch.Tensor]:
        """``loss`` (the weighted objective) plus its terms and the organ accuracy."""
        count = views[0].shape[0]
        # One encoder pass over both views: twice the batch per kernel, and the norm statistics
        # of a batch-norm encoder are taken over both views, as in SimCLR.
        features = self.encoder(torch.cat(views))
        projections = self.projection_head(features).float()
        logits = self.organ_head(features).float()
        z1, z2 = projections.split(count)
        targets = organs.repeat(len(views))
        # The losses run in float32 even under bf16 autocast: the similarity matmul and the
        # softmax over 2N logits / temperature are where bfloat16's 8-bit mantissa hurts.
        with torch.autocast(features.device.type, enabled=False):
            terms = {
                "loss_con": nt_xent_loss(z1, z2, self.loss_config.temperature, self.loss_config.gather_distributed),
                "loss_sup": organ_ce_loss(logits, targets) * (len(views) if self.loss_config.organ_views == "sum" else 1),
            }
        weights = {"loss_con": self.loss_config.contrastive_weight, "loss_sup": self.loss_config.organ_weight}
        total = sum(weights[name] * term for name, term in terms.items() if weights[name] > 0)
        return {"loss": total, **terms, "organ_acc": organ_accuracy(logits.detach(), targets)}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        results = self.compute_losses(batch["image"], batch["organ"])
        count = batch["organ"].shape[0]
        self.log_dict(
            {f"train/{name}": value.detach() for name, value in results.items()},
            on_step=True,
            prog_bar=False,
            batch_size=count,
            sync_dist=True,
        )
        self.log("loss", results["loss"].detach(), prog_bar=True, logger=False, batch_size=count)
        return results["loss"]

    def global_batch_size(self) -> int:
        trainer = self.trainer
        return self.batch_size * trainer.world_size * trainer.accumulate_grad_batches

    def configure_optimizers(self):
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps <= 0:
            raise ValueError("pretraining is bounded by trainer.max_steps (a fixed step budget); set it > 0")
        optimizer = build_lars(self, self.optimizer_config, scaled_lr(self.optimizer_config.lr_per_256, self.global_batch_size()))
        scheduler = LambdaLR(optimizer, schedule_lambda(total_steps, self.schedule_config))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
