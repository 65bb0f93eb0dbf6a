"""A 3-class phantom CV end to end: macro metrics equal scikit-learn's on the written predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from tests.stages.test_finetune_cv import tiny_config
from tus.config import ConfigError
from tus.data.phantom import generate_phantom
from tus.methods.classifier import load_finetuned
from tus.stages.finetune_cv import run_cv

# Labels written as names: the classes are inferred, sorted.
INFERRED = ["diffuse", "focal_lesion", "homogeneous"]


@pytest.fixture
def named_phantom(tmp_path: Path) -> Path:
    paths = generate_phantom(tmp_path / "phantom", num_patients=12, images_per_patient=(2, 3), image_size=32, positive_fraction=0.67, pool_size=0, seed=0, classes=3)
    frame = pd.read_csv(paths.labeled_manifest)
    frame["label"] = frame["class_name"]
    frame.to_csv(paths.labeled_manifest, index=False)
    return paths.labeled_manifest


def test_three_class_phantom_cv_end_to_end(named_phantom: Path, tmp_path: Path):
    run_dir = run_cv(tiny_config(named_phantom, tmp_path / "runs", "name=three"))
    # The inferred classes are recorded in the run's config.
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["label_names"] == INFERRED
    folds = pd.read_csv(run_dir / "folds.csv")
    for fold in range(3):  # 4 patients per class, 3 folds: every class in every test fold
        assert set(folds.loc[folds["fold"] == fold, "label"]) == {0, 1, 2}
    runs = []
    for fold in range(3):
        folder = run_dir / "runs" / f"fold{fold}-seed0"
        predictions = pd.read_csv(folder / "predictions.csv")
        assert list(predictions.columns) == ["sample_id", "label", "prediction", "prob_diffuse", "prob_focal_lesion", "prob_homogeneous"]
        labels, probs = predictions["label"].to_numpy(), predictions[["prob_diffuse", "prob_focal_lesion", "prob_homogeneous"]].to_numpy()
        assert np.array_equal(predictions["prediction"], probs.argmax(1))
        predicted = probs.argmax(1)
        # Balanced accuracy written out: the mean over classes of each class's recall.
        balanced = np.mean([(predicted[labels == k] == k).mean() for k in range(3)])
        recorded = json.loads((folder / "metrics.json").read_text())
        expected = {
            "accuracy": accuracy_score(labels, predicted),
            "balanced_accuracy": balanced,
            "f1": f1_score(labels, predicted, average="macro", zero_division=0),
            "precision": precision_score(labels, predicted, average="macro", zero_division=0),
            "recall": recall_score(labels, predicted, average="macro", zero_division=0),
            "auroc": roc_auc_score(labels, probs / probs.sum(1, keepdims=True), multi_class="ovr", average="macro"),
        }
        for k, name in enumerate(INFERRED):
            expected[f"recall_{name}"] = (predicted[labels == k] == k).mean()
            expected[f"auroc_{name}"] = roc_auc_score(labels == k, probs[:, k])
        for name, value in expected.items():
            assert recorded[name] == pytest.approx(value, abs=1e-6), name
        runs.append(recorded)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["label_names"] == INFERRED
    for name in ("accuracy", "balanced_accuracy", "f1", "auroc", "precision_diffuse", "auroc_homogeneous"):
        assert summary["metrics"][name]["mean"] == pytest.approx(np.mean([r[name] for r in runs]))
        assert summary["ci"][name]["low"] <= summary["ci"][name]["high"]
    # Majority baseline: homogeneous; its accuracy is its share of the images.
    labels = pd.read_csv(named_phantom)["class_name"]
    share = (labels == "homogeneous").mean()
    assert summary["baselines"]["majority_class"] == "homogeneous"
    assert summary["baselines"]["always_majority"]["accuracy"] == pytest.approx(share)
    table = (run_dir / "summary.md").read_text()
    assert "| | Accuracy | Balanced accuracy | Macro F1 | Macro precision | Macro recall | Macro AUROC |" in table
    lines = table.splitlines()
    macro = next(i for i, line in enumerate(lines) if line.startswith("| three (macro) |"))
    class_rows = [line for line in lines if line.startswith("| class ")]
    assert [row.split(" | ")[0] for row in class_rows] == [f"| class {name}" for name in INFERRED]
    assert lines.index(class_rows[0]) > macro
    assert (run_dir / "figures" / "confusion.csv").is_file() and (run_dir / "figures" / "roc_diffuse.png").is_file()
    assert len(pd.read_csv(run_dir / "figures" / "confusion.csv")) == 9
    model = load_finetuned(run_dir / "runs" / "fold0-seed0" / "model.safetensors")
    assert model.head.out_features == 3
    assert json.loads((run_dir / "runs" / "fold0-seed0" / "config.json").read_text())["label_names"] == INFERRED


def test_thresholds_and_calibration_are_refused_for_three_classes(named_phantom: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"thresholds and calibration are binary-only, but data.label_names has 3 classes"):
        run_cv(tiny_config(named_phantom, tmp_path / "runs", "threshold=youden"))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_predict_with_a_three_class_fold_model_writes_a_column_per_class_and_macro_metrics(named_phantom: Path, tmp_path: Path):
    from tus.stages.predict import run_predict

    run_dir = run_cv(tiny_config(named_phantom, tmp_path / "runs", "name=three", "trainer.max_epochs=1", "data.num_folds=2"))
    result = run_predict(run_dir / "runs" / "fold0-seed0", named_phantom, tmp_path / "preds.csv")
    table = pd.read_csv(tmp_path / "preds.csv")
    columns = [f"prob_{name}" for name in INFERRED]
    assert [c for c in table.columns if c.startswith("prob_")] == columns
    probs = table[columns].to_numpy()
    assert table["prediction"].tolist() == [INFERRED[k] for k in probs.argmax(1)]
    labels = np.array([INFERRED.index(name) for name in pd.read_csv(named_phantom)["class_name"]])
    metrics = result["labelled"]["metrics"]
    assert metrics["f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro", zero_division=0))
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, probs / probs.sum(1, keepdims=True), multi_class="ovr"))
    assert "| class focal_lesion |" in (tmp_path / "preds.summary.md").read_text()
