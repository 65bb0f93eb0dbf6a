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

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightning.pytorch.callbacks import Callback
from sklearn.neighbors import KNeighborsClassifier
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from tus.config import to_dict
from tus.models.backbones import BackboneConfig, create_backbone
from tus.optim import LarsConfig, ScheduleConfig, build_lars, schedule_lambda, scaled_lr

UNKNOWN_ORGAN = -1


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

    def __post_init__(self) -> None:
        if self.contrastive_weight < 0 or self.organ_weight < 0:
            raise ValueError("loss weights must be >= 0")
        if self.contrastive_weight == 0 and self.organ_weight == 0:
            raise ValueError("at least one of loss.contrastive_weight and loss.organ_weight must be > 0")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather_distributed: bool = False) -> torch.Tensor:
    """SimCLR's NT-Xent (Eq. 1-2) for projections of the two views, mean over the 2N anchors.

    With ``gather_distributed`` and an initialised process group, each rank scores its own
    anchors against the views of *all* ranks (lightly gathers them with gradients). A rank's
    loss is the mean over its anchors, so the mean over ranks is the global-batch loss; the
    gather's backward all-reduces gradients, giving each rank world_size x its share of the
    global gradient, which DDP's averaging brings back to exactly the global gradient.
    """
    return NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)(z1, z2)


def organ_ce_loss(logits: torch.Tensor, organs: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over views with a known organ (Eq. 3); unknown organs (-1) are skipped.

    Unlike ``F.cross_entropy(ignore_index=...)`` this is 0 rather than NaN for a batch without
    any known organ. Under DDP each rank averages over its own known organs, which equals the
    global mean when ranks hold as many known organs each (always true for a fully labelled pool).
    """
    per_view = F.cross_entropy(logits, organs.clamp_min(0), reduction="none")
    known = (organs != UNKNOWN_ORGAN).to(per_view.dtype)
    return (per_view * known).sum() / known.sum().clamp_min(1.0)


def organ_accuracy(logits: torch.Tensor, organs: torch.Tensor) -> torch.Tensor:
    """Share of views with a known organ whose argmax is right (NaN-free: 0 when none)."""
    known = organs != UNKNOWN_ORGAN
    correct = (logits.argmax(dim=1) == organs) & known
    return correct.sum().float() / known.sum().clamp_min(1).float()


class PretrainModule(L.LightningModule):
    """f, g, h trained with ``L_con + lambda * L_sup``, LARS and a warmup + decay schedule.

    ``batch_size`` is per device; the learning rate is ``optimizer.lr_per_256`` scaled by the
    global batch (batch_size x world_size x accumulate_grad_batches). The schedule spans
    ``trainer.max_steps`` optimizer steps.
    """

    def __init__(
        self,
        model: PretrainModelConfig,
        loss: PretrainLossConfig,
        optimizer: LarsConfig,
        schedule: ScheduleConfig,
        *,
        num_organs: int,
        batch_size: int,
    ):
        super().__init__()
        self.save_hyperparameters({
            "model": to_dict(model),
            "loss": to_dict(loss),
            "optimizer": to_dict(optimizer),
            "schedule": to_dict(schedule),
            "num_organs": num_organs,
            "batch_size": batch_size,
        })
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
                "loss_sup": organ_ce_loss(logits, targets),
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


@torch.no_grad()
def encode(module: PretrainModule, dataset: Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, organ-head predictions, organ labels) for a dataset of single-view items."""
    was_training = module.training
    module.eval()
    features, predictions, organs = [], [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            encoded = module.encoder(batch["image"].to(module.device))
            features.append(encoded.float().cpu())
            predictions.append(module.organ_head(encoded).argmax(dim=1).cpu())
            organs.append(batch["organ"])
    finally:
        module.train(was_training)
    return torch.cat(features).numpy(), torch.cat(predictions).numpy(), torch.cat(organs).numpy()


def knn_accuracy(bank_features: np.ndarray, bank_labels: np.ndarray, features: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Accuracy of a cosine k-NN classifier (distance-weighted vote) fitted on the bank."""
    classifier = KNeighborsClassifier(n_neighbors=min(k, len(bank_labels)), metric="cosine", weights="distance")
    classifier.fit(bank_features, bank_labels)
    return float((classifier.predict(features) == labels).mean())


class OrganProbe(Callback):
    """At the start, every ``every_n_steps`` optimizer steps and after the last, score the organ on held-out images.

    ``bank`` (training-pool images) and ``heldout`` (images kept out of training) are
    single-view datasets under the eval transform, with known organs. Logs
    ``probe/knn_organ_acc`` (k-NN on encoder features: the representation itself) and
    ``probe/head_organ_acc`` (the organ head h). Every rank computes the same numbers (the
    weights are identical), which keeps the ranks in step. ``history`` keeps every result.
    """

    def __init__(self, bank: Dataset, heldout: Dataset, *, every_n_steps: int, k: int = 20, batch_size: int = 256):
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be > 0, got {every_n_steps}")
        self.bank = bank
        self.heldout = heldout
        self.every_n_steps = every_n_steps
        self.k = k
        self.batch_size = batch_size
        self.history: list[dict] = []
        self._last_probed_step = -1

    def evaluate(self, module: PretrainModule) -> dict[str, float]:
        bank_features, _, bank_organs = encode(module, self.bank, self.batch_size)
        features, predictions, organs = encode(module, self.heldout, self.batch_size)
        return {
            "probe/knn_organ_acc": knn_accuracy(bank_features, bank_organs, features, organs, self.k),
            "probe/head_organ_acc": float((predictions == organs).mean()),
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: PretrainModule) -> None:
        # The starting point (random or given init), so later numbers have a baseline.
        if trainer.global_step == 0:
            self._probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: PretrainModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        due = step % self.every_n_steps == 0 or step == trainer.max_steps
        # With gradient accumulation several batches share one optimizer step; probe it once.
        if due and step != self._last_probed_step:
            self._probe(trainer, pl_module)

    def _probe(self, trainer: L.Trainer, pl_module: PretrainModule) -> None:
        step = trainer.global_step
        self._last_probed_step = step
        results = self.evaluate(pl_module)
        self.history.append({"step": step, **results})
        # Straight to the loggers (rank zero only): Lightning's self.log is not allowed in
        # on_train_start, and these are point measurements, not step aggregates.
        for logger in trainer.loggers:
            logger.log_metrics(results, step=step)
