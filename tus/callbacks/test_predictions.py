"""The test pass's per-image outputs, kept as the test loop produces them: ``predictions.csv``
comes from the same forward pass as the test metrics (no second pass over the test fold)."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class TestPredictions(Callback):
    """Keeps each test batch's sample ids, labels and class probabilities (the module's
    ``test_step`` returns ``{"probabilities": (B, K)}``); a new test pass starts over."""

    __test__ = False  # not a pytest test class, despite its name

    def __init__(self) -> None:
        self._batches: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batches = []

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batches.append((list(batch["sample_id"]), batch["label"].detach().cpu(), outputs["probabilities"].detach().float().cpu()))

    def arrays(self, num_classes: int) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Sample ids, labels (N,) and class probabilities (N, ``num_classes``) of the last test pass, in its order."""
        if not self._batches:
            return [], np.zeros(0, dtype=np.int64), np.zeros((0, num_classes))
        sample_ids = [sample_id for ids, _, _ in self._batches for sample_id in ids]
        labels = torch.cat([labels for _, labels, _ in self._batches]).numpy()
        probabilities = torch.cat([p for _, _, p in self._batches]).numpy()
        return sample_ids, labels, probabilities
