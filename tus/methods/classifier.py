"""FineTuneModule: a timm backbone plus one linear head for binary classification.

Positive class = 1 (inhomogeneous). ``training_step`` returns the per-sample losses with the
batch's loss, so callbacks (the per-sample loss recorder) read them without an extra
forward pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryF1Score, BinaryPrecision, BinaryRecall

from tus.config import from_dict, to_dict
from tus.models.backbones import BackboneConfig, CheckpointError, create_backbone, read_state_dict

METRIC_NAMES = ("accuracy", "f1", "precision", "recall", "auroc")


@dataclass
class FineTuneOptimConfig:
    """AdamW with separate learning rates for the pretrained backbone and the new head."""

    lr_backbone: float = 1e-5
    lr_head: float = 1e-4
    weight_decay: float = 0.01


def binary_metrics(prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "accuracy": BinaryAccuracy(),
            "f1": BinaryF1Score(),
            "precision": BinaryPrecision(),
            "recall": BinaryRecall(),
            "auroc": BinaryAUROC(),
        },
        prefix=prefix,
    )


class FineTuneModule(L.LightningModule):
    def __init__(self, backbone: dict | BackboneConfig, optim: dict | FineTuneOptimConfig, num_classes: int = 2):
        super().__init__()
        # Hyperparameters are stored as plain dicts so checkpoints stay weights_only-loadable.
        backbone = backbone if isinstance(backbone, BackboneConfig) else from_dict(BackboneConfig, backbone)
        optim = optim if isinstance(optim, FineTuneOptimConfig) else from_dict(FineTuneOptimConfig, optim)
        self.save_hyperparameters({"backbone": to_dict(backbone), "optim": to_dict(optim), "num_classes": num_classes})
        self.optim_config = optim
        self.backbone = create_backbone(backbone)
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        self.val_metrics = binary_metrics("val/")
        self.test_metrics = binary_metrics("test/")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self(batch["image"])
        per_sample_loss = F.cross_entropy(logits.float(), batch["label"], reduction="none")
        loss = per_sample_loss.mean()
        accuracy = (logits.argmax(1) == batch["label"]).float().mean()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(logits))
        self.log("train/accuracy", accuracy, on_step=False, on_epoch=True, batch_size=len(logits))
        return {"loss": loss, "per_sample_loss": per_sample_loss.detach()}

    def _evaluate(self, batch: dict, metrics: MetricCollection, stage: str) -> None:
        logits = self(batch["image"]).float()
        loss = F.cross_entropy(logits, batch["label"])
        probability = logits.softmax(1)[:, 1]
        metrics.update(probability, batch["label"])
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=len(logits), sync_dist=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            [
                {"params": self.backbone.parameters(), "lr": self.optim_config.lr_backbone},
                {"params": self.head.parameters(), "lr": self.optim_config.lr_head},
            ],
            weight_decay=self.optim_config.weight_decay,
        )


def save_finetuned(module: FineTuneModule, path) -> None:
    """Export the trained classifier as safetensors plus its hyperparameters as JSON."""
    path = Path(path).with_suffix(".safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps(dict(module.hparams), indent=2))


def load_finetuned(path) -> FineTuneModule:
    """Rebuild a classifier from :func:`save_finetuned` output or a Lightning checkpoint.

    The backbone is built empty (``init=scratch``) and then receives the saved weights, so
    loading never needs the original pretrained files or a model hub.
    """
    path = Path(path)
    if path.suffix == ".ckpt":
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # corrupt or foreign pickles all land here
            raise CheckpointError(f"{path}: not a loadable Lightning checkpoint ({error})") from error
        hparams, state = checkpoint.get("hyper_parameters"), checkpoint.get("state_dict")
        if not hparams or state is None:
            raise CheckpointError(f"{path}: not a tus fine-tuning checkpoint (no hyper_parameters/state_dict)")
    else:
        meta = path.with_suffix(".json")
        if not meta.is_file():
            raise CheckpointError(f"{path}: no {meta.name} beside it; is this a tus fine-tuned model?")
        hparams, state = json.loads(meta.read_text()), read_state_dict(path)
    backbone = {**hparams["backbone"], "init": "scratch", "weights": None}
    module = FineTuneModule(backbone, hparams["optim"], hparams.get("num_classes", 2))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return module.eval()
