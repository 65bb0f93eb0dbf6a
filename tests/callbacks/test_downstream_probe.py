"""DownstreamProbe: the logged AUROC equals a hand computation on known embeddings."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler
from torch import nn

from tus.callbacks.probes import DownstreamProbe

SIZE = 8
# Fixed projection of the feature encoder: features are a known function of the image intensity.
PROJECTION = torch.tensor([[1.0, 0.3, -0.5], [0.2, -1.0, 0.7]])


class IntensityEncoder(nn.Module):
    """Feature of a constant image of intensity v: [m, m^2] @ PROJECTION with m its normalised value."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        m = image.mean(dim=(1, 2, 3))
        return torch.stack([m, m**2], dim=1) @ PROJECTION


def reference_features(values: np.ndarray) -> np.ndarray:
    m = (values / 255.0 - 0.5) / 0.25  # tus' normalisation (mean 0.5, std 0.25)
    return np.stack([m, m**2], axis=1) @ PROJECTION.numpy().astype(np.float64)


class FixedEncoderModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = IntensityEncoder()
        self.dummy = nn.Parameter(torch.zeros(1))  # something to optimise; the encoder never changes

    def training_step(self, batch, batch_idx):
        return (self.dummy - 1.0).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=2)


def constant_image_manifest(folder: Path, labels: list, means: dict, std: float, rng: np.random.Generator) -> tuple[str, pd.DataFrame, np.ndarray]:
    """Patient p's 2 constant images of label ``labels[p]``, intensity ~ N(means[label], std) with
    overlap between classes, all intensities distinct (no zero cosine distances, no ties)."""
    rows, values = [], []
    for patient, label in enumerate(labels):
        for view in range(2):
            value = int(np.clip(rng.normal(means[label], std), 5, 250))
            while value in values:
                value += 1
            path = folder / f"p{patient}_{view}.png"
            Image.fromarray(np.full((SIZE, SIZE), value, dtype=np.uint8)).save(path)
            rows.append({"path": str(path), "patient_id": f"p{patient}", "label": label})
            values.append(value)
    frame = pd.DataFrame(rows)
    manifest = folder / "manifest.csv"
    frame.to_csv(manifest, index=False)
    return str(manifest), frame, np.asarray(values, dtype=np.float64)


@pytest.fixture
def labelled(tmp_path) -> tuple[str, pd.DataFrame, np.ndarray]:
    """30 patients x 2 constant images; malignant images are brighter on average, with overlap."""
    return constant_image_manifest(tmp_path, [int(p % 3 == 0) for p in range(30)], {0: 110, 1: 150}, 30, np.random.default_rng(3))


def reference_folds(frame: pd.DataFrame, num_folds: int, seed: int) -> np.ndarray:
    splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    folds = np.zeros(len(frame), dtype=int)
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(frame)), frame["label"], frame["patient_id"])):
        folds[test] = fold
    return folds


def knn_class_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, k: int, num_classes: int = 2) -> np.ndarray:
    """Distance-weighted cosine k-NN vote share of each class (N, K), by hand."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    distance = 1.0 - unit(test_x) @ unit(train_x).T
    scores = np.zeros((len(test_x), num_classes))
    for row, d in enumerate(distance):
        nearest = np.argsort(d)[:k]
        weights = 1.0 / d[nearest]
        for c in range(num_classes):
            scores[row, c] = weights[train_y[nearest] == c].sum() / weights.sum()
    return scores


def reference_auroc(features: np.ndarray, labels: np.ndarray, folds: np.ndarray, classifier: str, k: int) -> float:
    aurocs = []
    for fold in range(folds.max() + 1):
        train, test = folds != fold, folds == fold
        if classifier == "knn":
            scores = knn_class_scores(features[train], labels[train], features[test], k)[:, 1]
        else:
            scaler = StandardScaler().fit(features[train])
            model = LogisticRegression(max_iter=1000).fit(scaler.transform(features[train]), labels[train])
            scores = model.predict_proba(scaler.transform(features[test]))[:, 1]
        aurocs.append(roc_auc_score(labels[test], scores))
    return float(np.mean(aurocs))


@pytest.mark.parametrize("classifier", ["knn", "logistic"])
def test_auroc_matches_hand_computation(labelled, classifier):
    manifest, frame, values = labelled
    probe = DownstreamProbe(manifest, every_n_steps=1, image_size=SIZE, classifier=classifier, k=5, num_folds=3, seed=7, cache=False)
    expected_folds = reference_folds(frame, 3, 7)
    assert np.array_equal(probe.folds, expected_folds)
    expected = reference_auroc(reference_features(values), frame["label"].to_numpy(), expected_folds, classifier, k=5)
    got = probe.evaluate(FixedEncoderModule())["probe/downstream_auroc"]
    assert got == pytest.approx(expected, abs=1e-6)
    assert 0.6 < expected < 1.0  # a task the probe can partly, not trivially, solve


def test_logs_every_n_steps_to_the_loggers(labelled, tmp_path):
    manifest, frame, values = labelled
    probe = DownstreamProbe(manifest, every_n_steps=2, image_size=SIZE, classifier="knn", k=5, num_folds=3, seed=7, cache=False)
    expected = reference_auroc(reference_features(values), frame["label"].to_numpy(), reference_folds(frame, 3, 7), "knn", k=5)
    trainer = L.Trainer(
        max_steps=3,
        logger=CSVLogger(tmp_path / "logs", name="", version=""),
        callbacks=[probe],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(FixedEncoderModule())
    # The start (step 0), every 2nd step, and the last step.
    assert [entry["step"] for entry in probe.history] == [0, 2, 3]
    assert all(entry["probe/downstream_auroc"] == pytest.approx(expected, abs=1e-6) for entry in probe.history)
    logged = pd.read_csv(tmp_path / "logs" / "metrics.csv").dropna(subset=["probe/downstream_auroc"])
    assert logged["step"].tolist() == [0, 2, 3]
    assert np.allclose(logged["probe/downstream_auroc"], expected, atol=1e-6)


def test_refuses_a_one_class_task_and_bad_arguments(labelled):
    manifest, frame, _ = labelled
    with pytest.raises(ValueError, match="every_n_steps"):
        DownstreamProbe(manifest, every_n_steps=0, image_size=SIZE)
    with pytest.raises(ValueError, match="classifier"):
        DownstreamProbe(manifest, every_n_steps=1, image_size=SIZE, classifier="svm")
    one = frame.assign(label=0, sample_id=frame["path"], abs_path=frame["path"])
    with pytest.raises(ValueError, match="at least two classes"):
        DownstreamProbe(one, every_n_steps=1, image_size=SIZE)


def mann_whitney_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """AUROC as the share of (positive, negative) pairs ordered right, ties counting half."""
    pos, neg = scores[positive], scores[~positive]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg)))


@pytest.mark.parametrize("classifier", ["knn", "logistic"])
def test_three_classes_score_the_macro_one_vs_rest_auroc(tmp_path, classifier):
    """BUSI-like names in the label column (3 classes, read sorted): the probe's score is, per test
    fold, the mean over classes of the class-vs-rest AUROC of the probe's class scores, by hand."""
    names = ["benign", "malignant", "normal"]
    manifest, frame, values = constant_image_manifest(tmp_path, [names[p % 3] for p in range(36)], {"benign": 100, "malignant": 150, "normal": 125}, 20, np.random.default_rng(5))
    probe = DownstreamProbe(manifest, every_n_steps=1, image_size=SIZE, classifier=classifier, k=5, num_folds=3, seed=7, cache=False)
    labels = frame["label"].map(names.index).to_numpy()
    folds = reference_folds(frame.assign(label=labels), 3, 7)
    assert np.array_equal(probe.folds, folds)
    features = reference_features(values)
    expected = []
    for fold in range(3):
        train, test = folds != fold, folds == fold
        if classifier == "knn":
            scores = knn_class_scores(features[train], labels[train], features[test], 5, num_classes=3)
        else:
            scaler = StandardScaler().fit(features[train])
            scores = LogisticRegression(max_iter=1000).fit(scaler.transform(features[train]), labels[train]).predict_proba(scaler.transform(features[test]))
        expected.append(np.mean([mann_whitney_auroc(labels[test] == c, scores[:, c]) for c in range(3)]))
    got = probe.evaluate(FixedEncoderModule())["probe/downstream_auroc"]
    assert got == pytest.approx(float(np.mean(expected)), abs=1e-6)
    assert 0.6 < got < 1.0
    # The UMAP-by-label table names the classes as the manifest does.
    from tus.callbacks.probes import write_downstream_embeddings

    table = pd.read_csv(write_downstream_embeddings(FixedEncoderModule(), probe, tmp_path / "embeddings.csv"))
    assert table["label"].tolist() == frame["label"].tolist()


def test_downstream_embeddings_table_holds_each_images_label_and_features(labelled, tmp_path):
    """The UMAP-by-label input: one row per manifest image, its label, and the encoder's features
    (the known function of its intensity), in the manifest's order."""
    from tus.callbacks.probes import write_downstream_embeddings

    manifest, frame, values = labelled
    probe = DownstreamProbe(manifest, every_n_steps=1, image_size=SIZE, cache=False)
    table = pd.read_csv(write_downstream_embeddings(FixedEncoderModule(), probe, tmp_path / "downstream_embeddings.csv"))
    assert list(table.columns) == ["sample_id", "label", "f0", "f1", "f2"]
    assert table["label"].tolist() == frame["label"].tolist()
    assert table[["f0", "f1", "f2"]].to_numpy() == pytest.approx(reference_features(values), rel=1e-4, abs=1e-4)
