"""Insert synthetic markers into batches on the fly, for training or for evaluation.

At training time this is marker-insertion augmentation applied on the device batch; at
validation/test time it measures marker sensitivity: run the same checkpoint with and
without the callback and compare predictions (TesticulUS, Fig. 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np

from tus.data.markers import MarkerConfig, inject_markers_into_batch

STAGES = ("train", "val", "test")


class MarkerInjector(L.Callback):
    """Marks ``batch["image"]`` in place at the start of each batch of the given stages.

    ``stages`` is a subset of ``("train", "val", "test")``. The markers of a batch come
    from a generator seeded by (seed, stage, epoch, dataloader index, batch index), with
    the epoch counted only for training: evaluation batches get the same markers every
    epoch, so a marker-sensitivity curve compares like with like, while training sees
    fresh markers each epoch. The masks go to ``batch["marker_mask"]`` for dict batches;
    a tuple/list batch is marked through its first element.
    """

    def __init__(
        self,
        stages: Sequence[str] = ("train",),
        probability: float = 1.0,
        config: MarkerConfig | None = None,
        seed: int = 0,
        mean: float = 0.5,
        std: float = 0.25,
    ):
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stages {unknown}; choose from {STAGES}")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        self.stages = tuple(stages)
        self.probability = probability
        self.config = config or MarkerConfig()
        self.seed = seed
        self.mean = mean
        self.std = std

    def mark(self, batch: Any, stage: str, epoch: int, batch_idx: int, dataloader_idx: int) -> None:
        """Mark ``batch`` in place if ``stage`` is one of the configured stages."""
        if stage not in self.stages:
            return
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        rng = np.random.default_rng([self.seed, STAGES.index(stage), epoch, dataloader_idx, batch_idx])
        marked, masks = inject_markers_into_batch(images, rng, self.config, self.mean, self.std, self.probability)
        images.copy_(marked)
        if isinstance(batch, dict):
            batch["marker_mask"] = masks

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.mark(batch, "train", trainer.current_epoch, batch_idx, 0)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.mark(batch, "val", 0, batch_idx, dataloader_idx)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.mark(batch, "test", 0, batch_idx, dataloader_idx)
