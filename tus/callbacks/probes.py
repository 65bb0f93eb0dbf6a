"""Representation probes during pretraining, logged every N steps for any method: a k-NN classifier of
held-out images' organs on the current encoder's features (:class:`OrganProbe`), and a k-NN or
logistic-regression probe of a labelled downstream task (:class:`DownstreamProbe`), so a user sees
whether the encoder gets better for *their* task, not only for organs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, Dataset

from tus.data.datasets import ManifestDataset
from tus.data.folds import assign_folds
from tus.data.manifest import LABEL_NAMES_ATTR, load_manifest
from tus.data.transforms import eval_transform
from tus.eval.cv_metrics import multiclass_metrics


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


class PeriodicProbe(Callback):
    """Runs ``evaluate(module)`` at the start of training and every ``every_n_steps`` optimizer
    steps (and at the last step), keeps ``history`` and logs each result to the loggers."""

    def __init__(self, every_n_steps: int):
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be > 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.history: list[dict] = []
        self._last_probed_step = -1

    def evaluate(self, module: L.LightningModule) -> dict[str, float]:
        raise NotImplementedError

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The starting point (random or given init), so later numbers have a baseline; a run
        # resumed from a checkpoint taken on a probe step probes again, since the probe of the
        # killed attempt ran after that checkpoint and its log row was dropped on resume.
        if trainer.global_step % self.every_n_steps == 0:
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


class OrganProbe(PeriodicProbe):
    """At the start, every ``every_n_steps`` optimizer steps and after the last, score the organ on held-out images.

    ``bank`` (training-pool images) and ``heldout`` (images kept out of training) are
    single-view datasets under the eval transform, with known organs. Logs
    ``probe/knn_organ_acc`` (k-NN on encoder features: the representation itself) and
    ``probe/head_organ_acc`` (the organ head h). Every rank computes the same numbers (the
    weights are identical), which keeps the ranks in step. ``history`` keeps every result.
    """

    def __init__(self, bank: Dataset, heldout: Dataset, *, every_n_steps: int, k: int = 20, batch_size: int = 256):
        super().__init__(every_n_steps)
        self.bank = bank
        self.heldout = heldout
        self.k = k
        self.batch_size = batch_size

    def evaluate(self, module: L.LightningModule) -> dict[str, float]:
        bank_features, _, bank_organs = encode(module, self.bank, self.batch_size)
        features, predictions, organs = encode(module, self.heldout, self.batch_size)
        return {
            "probe/knn_organ_acc": knn_accuracy(bank_features, bank_organs, features, organs, self.k),
            "probe/head_organ_acc": float((predictions == organs).mean()),
        }


ProbeClassifier = Literal["knn", "logistic"]


@torch.no_grad()
def embed(module: L.LightningModule, dataset: Dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(pooled ``module.encoder`` features, labels) of a labelled single-view dataset, in eval mode."""
    was_training = module.training
    module.eval()
    features, labels = [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            encoded = module.encoder(batch["image"].to(module.device))
            # An encoder that keeps spatial (or token) axes is average-pooled to one vector per image.
            features.append((encoded.flatten(2).mean(-1) if encoded.ndim > 2 else encoded).float().cpu())
            labels.append(batch["label"])
    finally:
        module.train(was_training)
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


def probe_auroc(features: np.ndarray, labels: np.ndarray, folds: np.ndarray, classifier: ProbeClassifier, k: int = 20, seed: int = 0) -> float:
    """Mean over folds of the test-fold AUROC of a probe fitted on the other folds.

    ``knn``: cosine k-NN with distance-weighted votes (a class's vote share is its score);
    ``logistic``: L2 logistic regression (sklearn's default C=1) on standardised features.
    Labels are the class indices 0..K-1. Two classes: the AUROC of class 1. K > 2 classes: the
    macro one-vs-rest AUROC, as a K > 2 fine-tuned classifier is scored
    (:func:`tus.eval.cv_metrics.multiclass_metrics`: the mean over the classes the test fold has
    and does not consist of; a class missing from the training folds scores 0 everywhere).
    """
    num_classes = int(labels.max()) + 1
    scores = []
    for fold in np.unique(folds):
        train, test = folds != fold, folds == fold
        if classifier == "knn":
            model = KNeighborsClassifier(n_neighbors=min(k, int(train.sum())), metric="cosine", weights="distance")
        else:
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
        model.fit(features[train], labels[train])
        probabilities = np.zeros((int(test.sum()), num_classes))
        probabilities[:, model.classes_.astype(int)] = model.predict_proba(features[test])
        if num_classes == 2:
            scores.append(roc_auc_score(labels[test], probabilities[:, 1]))
        else:
            scores.append(multiclass_metrics(labels[test], probabilities, [str(c) for c in range(num_classes)])["auroc"])
    return float(np.mean(scores))


class DownstreamProbe(PeriodicProbe):
    """At the start, every ``every_n_steps`` optimizer steps and after the last, probe a labelled task.

    The labelled ``manifest`` (``label`` of two or more classes, ``patient_id``) is split into ``num_folds``
    patient-grouped, class-stratified folds (:func:`tus.data.folds.assign_folds` with ``seed``);
    each probe embeds every image with the current encoder (eval transform, ``image_size``), fits
    ``classifier`` on the other folds and scores each fold. Logs ``probe/downstream_auroc`` (the
    mean over folds; macro one-vs-rest with K > 2 classes, see :func:`probe_auroc`) to the
    loggers; ``history`` keeps every result. ``label_names``: the manifest's K class names (as
    ``data.label_names``). The probe never updates the encoder, so probing images that were left
    out of the pool leaks nothing into training.
    """

    def __init__(
        self,
        manifest: str | Path | pd.DataFrame,
        *,
        every_n_steps: int,
        image_size: int,
        classifier: ProbeClassifier = "knn",
        k: int = 20,
        num_folds: int = 3,
        label_names: list[str] | None = None,
        seed: int = 0,
        batch_size: int = 256,
        cache: bool = True,
    ):
        super().__init__(every_n_steps)
        if classifier not in ("knn", "logistic"):
            raise ValueError(f"classifier must be 'knn' or 'logistic', got {classifier!r}")
        frame = manifest if isinstance(manifest, pd.DataFrame) else load_manifest(manifest, require_labels=True, num_folds=num_folds, label_names=label_names)
        if frame["label"].nunique() < 2:
            raise ValueError(f"the downstream probe needs at least two classes; found only {sorted(frame['label'].unique().tolist())}")
        self.frame = frame
        self.folds = assign_folds(frame, num_folds, seed)
        self.dataset = ManifestDataset(frame, eval_transform(), image_size=image_size, cache=cache)
        self.classifier: ProbeClassifier = classifier
        self.k = k
        self.seed = seed
        self.batch_size = batch_size

    def evaluate(self, module: L.LightningModule) -> dict[str, float]:
        features, labels = embed(module, self.dataset, self.batch_size)
        return {"probe/downstream_auroc": probe_auroc(features, labels, self.folds, self.classifier, self.k, self.seed)}


def write_heldout_embeddings(module: L.LightningModule, dataset: ManifestDataset, frame: pd.DataFrame, path: str | Path, batch_size: int = 256) -> Path:
    """The encoder's features of the held-out images as ``sample_id, organ, f0..fN`` (the UMAP's
    input, :func:`tus.figures.embeddings.umap_figure`); spatial features are average-pooled."""
    features, _, _ = encode(module, dataset, batch_size)
    if features.ndim > 2:
        features = features.reshape(len(features), features.shape[1], -1).mean(-1)
    table = pd.DataFrame(features, columns=[f"f{i}" for i in range(features.shape[1])])
    table.insert(0, "organ", frame["organ"].astype(str).to_numpy())
    table.insert(0, "sample_id", frame["sample_id"].astype(str).to_numpy())
    path = Path(path)
    table.to_csv(path, index=False, float_format="%.6g")
    return path


def write_downstream_embeddings(module: L.LightningModule, probe: DownstreamProbe, path: str | Path, batch_size: int = 256) -> Path:
    """The encoder's features of the downstream probe's labelled images as ``sample_id, label,
    [organ,] f0..fN`` (the UMAP by label, :func:`tus.figures.embeddings.umap_figure`); ``label``
    is the class name where the manifest's classes are named (K > 2), else 0/1."""
    features, labels = embed(module, probe.dataset, batch_size)
    table = pd.DataFrame(features, columns=[f"f{i}" for i in range(features.shape[1])])
    if "organ" in probe.frame.columns:
        table.insert(0, "organ", probe.frame["organ"].astype(str).to_numpy())
    names = probe.frame.attrs.get(LABEL_NAMES_ATTR)
    table.insert(0, "label", [names[label] for label in labels.astype(int)] if names else labels.astype(int))
    table.insert(0, "sample_id", probe.frame["sample_id"].astype(str).to_numpy())
    path = Path(path)
    table.to_csv(path, index=False, float_format="%.6g")
    return path
