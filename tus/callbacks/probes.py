"""Representation probes during pretraining: a k-NN classifier of held-out images on the current
encoder's features, logged every N steps (how separable the organs are, for any method)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from sklearn.neighbors import KNeighborsClassifier
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def encode(module: L.LightningModule, dataset: Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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

    def evaluate(self, module: L.LightningModule) -> dict[str, float]:
        bank_features, _, bank_organs = encode(module, self.bank, self.batch_size)
        features, predictions, organs = encode(module, self.heldout, self.batch_size)
        return {
            "probe/knn_organ_acc": knn_accuracy(bank_features, bank_organs, features, organs, self.k),
            "probe/head_organ_acc": float((predictions == organs).mean()),
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The starting point (random or given init), so later numbers have a baseline.
        if trainer.global_step == 0:
            self._probe(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        due = step % self.every_n_steps == 0 or step == trainer.max_steps
        # With gradient accumulation several batches share one optimizer step; probe it once.
        if due and step != self._last_probed_step:
            self._probe(trainer, pl_module)

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        self._last_probed_step = step
        results = self.evaluate(pl_module)
        self.history.append({"step": step, **results})
        # Straight to the loggers (rank zero only): Lightning's self.log is not allowed in
        # on_train_start, and these are point measurements, not step aggregates.
        for logger in trainer.loggers:
            logger.log_metrics(results, step=step)
