"""Grad-CAM++ (or Score-CAM) heatmaps of a fixed set of images, clean and with markers, during training.

At the end of validation (and of test) the logger explains the first ``num_images`` images
of the (first) val/test set, each shown clean and with synthetic markers (drawn once from
``marker_seed``, so every epoch shows the same markers), writes the overlay grid as
``<out_dir>/<stage>-epoch<E>.png`` with the marker-sensitivity numbers beside it
(``.json``), and logs both (numbers to every logger, the image to W&B when a WandbLogger is
attached). Only global rank 0 computes; the model's train/eval mode, gradients and hooks
are left as they were (see :func:`tus.eval.explain.explaining`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from tus.callbacks.configs import GradCAMConfig as GradCAMConfig
from tus.data.markers import MarkerConfig
from tus.eval.explain import add_markers, check_cam_method, measure_marker_sensitivity, save_overlay_grid


@dataclass
class _FixedImages:
    names: list[str]
    images: torch.Tensor
    marked: torch.Tensor
    masks: np.ndarray = field(repr=False)
    labels: list[int] | None = None


class GradCAMPlusPlusLogger(Callback):
    def __init__(
        self,
        out_dir: str | Path,
        num_images: int = 8,
        target_layer: str | None = None,
        marker_config: MarkerConfig | None = None,
        marker_seed: int = 0,
        every_n_epochs: int = 1,
        on_validation: bool = True,
        on_test: bool = True,
        method: str = "gradcam++",
    ):
        self.method = check_cam_method(method)
        if num_images < 1 or every_n_epochs < 1:
            raise ValueError(f"num_images and every_n_epochs must be >= 1, got {num_images}, {every_n_epochs}")
        self.out_dir = Path(out_dir)
        self.num_images = num_images
        self.target_layer = target_layer or None
        self.marker_config = marker_config or MarkerConfig()
        self.marker_seed = marker_seed
        self.every_n_epochs = every_n_epochs
        self.on_validation = on_validation
        self.on_test = on_test
        self._fixed: dict[str, _FixedImages] = {}
        self.last_summary: dict[str, dict] = {}

    @classmethod
    def from_config(cls, config: GradCAMConfig, out_dir: str | Path, marker_config: MarkerConfig | None = None) -> GradCAMPlusPlusLogger:
        return cls(
            out_dir,
            config.num_images,
            config.target_layer,
            marker_config,
            config.marker_seed,
            config.every_n_epochs,
            config.on_validation,
            config.on_test,
            config.method,
        )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0:
            self.explain(trainer, pl_module, "val", trainer.val_dataloaders)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_test:
            self.explain(trainer, pl_module, "test", trainer.test_dataloaders)

    def explain(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, loaders) -> None:
        if not trainer.is_global_zero:
            return
        fixed = self._fixed.get(stage) or self._fix_images(loaders)
        if fixed is None:
            return
        self._fixed[stage] = fixed
        device = pl_module.device
        result = measure_marker_sensitivity(pl_module, fixed.images.to(device), fixed.marked.to(device), fixed.masks, self.target_layer, self.method)
        self.target_layer = result.target_layer
        summary = result.summary()
        stem = self.out_dir / f"{stage}-epoch{trainer.current_epoch:03d}"
        image = save_overlay_grid(result, fixed.names, stem.with_suffix(".png"), fixed.labels)
        stem.with_suffix(".json").write_text(json.dumps({**summary, "epoch": trainer.current_epoch, "step": trainer.global_step, "images": fixed.names}, indent=2))
        self.last_summary[stage] = summary
        metrics = {f"{stage}/markers/{key}": float(value) for key, value in summary.items() if key not in ("num_images", "target_layer", "method")}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"{stage}/gradcam", images=[str(image)])

    def _fix_images(self, loaders) -> _FixedImages | None:
        """The first ``num_images`` items of the first loader's dataset, with their markers."""
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        dataset = getattr(loader, "dataset", None)
        if dataset is None or len(dataset) == 0:
            return None
        items = [dataset[i] for i in range(min(self.num_images, len(dataset)))]
        with torch.inference_mode(False):
            images = torch.stack([item["image"].clone() for item in items])
        marked, masks = add_markers(images, np.random.default_rng(self.marker_seed), self.marker_config)
        labels = [int(item["label"]) for item in items] if all("label" in item for item in items) else None
        return _FixedImages([str(item["sample_id"]) for item in items], images, marked, masks, labels)
