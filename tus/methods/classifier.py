"""FineTuneModule: a timm backbone plus one linear head for binary or K-class classification.

Binary: positive class = 1 (inhomogeneous). K > 2 (``num_classes``): softmax over the K classes,
validation and test metrics macro-averaged (torchmetrics' multiclass metrics). ``training_step`` returns the per-sample losses with the
batch's loss, so callbacks (the per-sample loss recorder) read them without an extra
forward pass.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from tus.config import from_dict, to_dict
from tus.eval.cv_metrics import METRIC_NAMES as METRIC_NAMES
from tus.methods.configs import FINETUNE_SCHEDULES as FINETUNE_SCHEDULES
from tus.methods.configs import FineTuneOptimConfig as FineTuneOptimConfig
from tus.models.backbones import BackboneConfig, create_backbone, create_head
from tus.models.export import WEIGHTS_FILE, classifier_normalization, load_export, save_export
from tus.models.vit import layerwise_lr_decay_groups
from tus.models.weights import CheckpointError
from tus.optim import ScheduleConfig, adamw, schedule_lambda

# Output index -> class name of the binary task (positive class 1 = inhomogeneous); written into exports.
LABEL_NAMES = ("homogeneous", "inhomogeneous")

ONECYCLE_DEFAULT_PCT_START = 0.3


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


def multiclass_metrics(prefix: str, num_classes: int) -> MetricCollection:
    """Macro averages over ``num_classes`` classes (``balanced_accuracy`` is the macro recall)."""
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "balanced_accuracy": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "auroc": MulticlassAUROC(num_classes, average="macro"),
        },
        prefix=prefix,
    )


def classification_metrics(prefix: str, num_classes: int) -> MetricCollection:
    return binary_metrics(prefix) if num_classes == 2 else multiclass_metrics(prefix, num_classes)


class FineTuneModule(L.LightningModule):
    def __init__(self, backbone: dict | BackboneConfig, optim: dict | FineTuneOptimConfig, num_classes: int = 2):
        super().__init__()
        # Hyperparameters are stored as plain dicts so checkpoints stay weights_only-loadable.
        backbone = backbone if isinstance(backbone, BackboneConfig) else from_dict(BackboneConfig, backbone)
        optim = optim if isinstance(optim, FineTuneOptimConfig) else from_dict(FineTuneOptimConfig, optim)
        self.save_hyperparameters({"backbone": to_dict(backbone), "optim": to_dict(optim), "num_classes": num_classes})
        self.optim_config = optim
        self.backbone = create_backbone(backbone)
        # MAE's head init for a ViT from MAE weights (BackboneConfig.head_init), nn.Linear's otherwise.
        self.head = create_head(self.backbone, backbone, num_classes)
        if num_classes < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.val_metrics = classification_metrics("val/", num_classes)
        self.test_metrics = classification_metrics("test/", num_classes)

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

    def _evaluate(self, batch: dict, metrics: MetricCollection, stage: str) -> torch.Tensor:
        """Update ``metrics`` and log the loss; returns the batch's class probabilities."""
        logits = self(batch["image"]).float()
        loss = F.cross_entropy(logits, batch["label"])
        probabilities = logits.softmax(1)
        metrics.update(probabilities[:, 1] if self.num_classes == 2 else probabilities, batch["label"])
        self.log(f"{stage}/loss", loss, on_epoch=True, batch_size=len(logits), sync_dist=True)
        return probabilities

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        # The probabilities go to on_test_batch_end: a CV writes its predictions.csv from the
        # pass its test metrics come from, not from a second pass over the test fold.
        return {"probabilities": self._evaluate(batch, self.test_metrics, "test")}

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        trainer = self.trainer
        total = int(trainer.estimated_stepping_batches)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        return self.build_optimizers(total, total / epochs if epochs else None)

    def build_optimizers(self, total_steps: int, steps_per_epoch: float | None) -> torch.optim.Optimizer | dict:
        """AdamW over (backbone, head) or, with ``layer_decay``, over the ViT's per-layer groups, and the
        learning-rate scheduler (stepped per optimiser step; it scales each group's learning rate)."""
        config = self.optim_config
        optimizer = adamw(self.param_groups(), weight_decay=config.weight_decay)
        if config.warmup_epochs and steps_per_epoch is None:
            raise ValueError("optim.warmup_epochs needs trainer.max_epochs; use optim.warmup_fraction with a step budget")
        warmup = config.warmup_steps(total_steps, steps_per_epoch or 0.0)
        if config.schedule == "constant" and warmup == 0:
            return optimizer  # the reference: a fixed learning rate
        if config.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[g["lr"] for g in optimizer.param_groups],
                total_steps=total_steps,
                pct_start=warmup / total_steps if warmup else ONECYCLE_DEFAULT_PCT_START,
                cycle_momentum=False,
            )
        else:
            decay = "cosine" if config.schedule == "cosine" else "constant"
            lr_lambda = schedule_lambda(total_steps, ScheduleConfig(warmup_steps=warmup, decay=decay))
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def param_groups(self) -> list[dict]:
        """The optimiser's parameter groups, each with its peak learning rate (see :class:`FineTuneOptimConfig`)."""
        config = self.optim_config
        if config.layer_decay is None:
            return [
                {"name": "backbone", "params": list(self.backbone.parameters()), "lr": config.backbone_lr},
                {"name": "head", "params": list(self.head.parameters()), "lr": config.lr_head},
            ]
        if not isinstance(self.backbone, VisionTransformer):
            raise ValueError(f"optim.layer_decay needs a ViT backbone, but {type(self.backbone).__name__} has no transformer blocks; set optim.layer_decay=null")
        return layerwise_lr_decay_groups(self.backbone, self.head, config.lr_head, config.weight_decay, layer_decay=config.layer_decay)


def save_finetuned(module: FineTuneModule, path: str | Path, image_size: int | None = None, label_names: Sequence[str] = LABEL_NAMES, input_spec: dict | None = None) -> Path:
    """Export the trained classifier as a folder: ``model.safetensors`` + ``config.json`` (:mod:`tus.models.export`).

    ``path`` is the folder; ``<folder>/model`` or ``<folder>/model.safetensors`` (what ``tus finetune-cv`` passes
    for a fold's run dir) name the same folder, so a fold's ``model.safetensors`` keeps its place. The config
    holds the module's constructor arguments (``hparams``), the architecture, ``image_size`` (when given) and
    ``label_names`` (output index -> class), and ``input`` (``input_spec``: how an image file became a training
    image before resizing: the DICOM frame choice and the crop recipe of a ``tus data crop`` dataset, which
    ``tus predict`` follows on new images). Returns the folder.
    """
    path = Path(path)
    folder = path.parent if path.name in ("model", WEIGHTS_FILE) else path
    hparams = json.loads(json.dumps(dict(module.hparams)))  # plain JSON types (tuples -> lists)
    backbone = hparams["backbone"]
    config = {
        "architecture": {"library": "timm", "name": backbone["name"], "kwargs": {"drop_rate": backbone.get("drop_rate", 0.0)}},
        "in_chans": backbone.get("in_chans", 1),
        "image_size": image_size,
        "normalization": classifier_normalization(backbone.get("in_chans", 1)),
        "label_names": list(label_names) if len(label_names) == hparams.get("num_classes", 2) else [str(k) for k in range(hparams.get("num_classes", 2))],
        "num_classes": hparams.get("num_classes", 2),
        "hparams": hparams,
    }
    if input_spec is not None:
        config["input"] = input_spec
    return save_export(folder, "classifier", module, config)


def load_finetuned(path: str | Path) -> FineTuneModule:
    """Rebuild a classifier from :func:`save_finetuned` output (its folder, ``config.json`` or ``model.safetensors``;
    an old ``model.safetensors`` + ``model.json`` too) or a Lightning checkpoint.

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
        config, state = load_export(path, "classifier")
        hparams = config["hparams"]
    hparams = dict(hparams)
    hparams["backbone"] = {**hparams["backbone"], "init": "scratch", "weights": None}
    module = FineTuneModule(**hparams)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return module.eval()
