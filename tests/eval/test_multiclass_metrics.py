"""K > 2 classes: macro metrics, baselines and patient-bootstrap CIs against scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from tus.eval.cv_metrics import metric_names, multiclass_metrics
from tus.eval.cv_summary import multiclass_baselines
from tus.eval.statistics import multiclass_bootstrap_cis

NAMES = ["a", "b", "c"]


def random_predictions(n: int = 60, patients: int = 15, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    frame = pd.DataFrame({"label": labels, "pred": probs.argmax(1), "patient_id": [f"P{i % patients}" for i in range(n)]})
    for k, name in enumerate(NAMES):
        frame[f"prob_{name}"] = probs[:, k]
    return frame


def test_macro_and_per_class_metrics_equal_sklearn():
    frame = random_predictions()
    labels, probs = frame["label"].to_numpy(), frame[[f"prob_{n}" for n in NAMES]].to_numpy()
    got = multiclass_metrics(labels, probs, NAMES)
    assert set(got) == set(metric_names(NAMES))
    predicted = probs.argmax(1)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert got["f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert got["precision"] == pytest.approx(precision_score(labels, predicted, average="macro"))
    assert got["recall"] == pytest.approx(recall_score(labels, predicted, average="macro"))
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    for k, name in enumerate(NAMES):
        tp = int(((predicted == k) & (labels == k)).sum())
        assert got[f"precision_{name}"] == pytest.approx(tp / (predicted == k).sum())
        assert got[f"recall_{name}"] == pytest.approx(tp / (labels == k).sum())


def test_baselines_equal_the_metrics_of_the_constant_and_expected_random_classifiers():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    rates = [0.5, 0.3, 0.2]
    base = multiclass_baselines(rates, NAMES)
    majority = np.zeros_like(labels)
    assert base["majority_class"] == "a"
    assert base["always_majority"]["accuracy"] == pytest.approx(accuracy_score(labels, majority))
    assert base["always_majority"]["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, majority))
    assert base["always_majority"]["f1"] == pytest.approx(f1_score(labels, majority, average="macro", zero_division=0))
    assert base["always_majority"]["precision"] == pytest.approx(precision_score(labels, majority, average="macro", zero_division=0))
    assert base["always_majority"]["recall"] == pytest.approx(recall_score(labels, majority, average="macro", zero_division=0))
    # The prior-matched guesser's expected confusion: true class i predicted j with probability p_i p_j.
    expected = np.outer(rates, rates)
    precision = np.diag(expected) / expected.sum(0)
    recall = np.diag(expected) / expected.sum(1)
    assert base["prior_random"]["accuracy"] == pytest.approx(np.trace(expected))
    assert base["prior_random"]["precision"] == pytest.approx(precision.mean())
    assert base["prior_random"]["recall"] == pytest.approx(recall.mean())
    assert base["prior_random"]["f1"] == pytest.approx(np.mean(2 * precision * recall / (precision + recall)))
    assert base["prior_random"]["f1_c"] == pytest.approx(0.2)


def test_bootstrap_cis_equal_sklearn_on_each_resampled_set():
    frame = random_predictions(n=45, patients=12, seed=3)
    n_boot, alpha = 40, 0.1
    cis = multiclass_bootstrap_cis(frame, NAMES, n_boot=n_boot, alpha=alpha, seed=5)
    # The documented draws: patients in np.unique order, rows of each drawn patient in draw order.
    patients = np.unique(frame["patient_id"])
    draws = np.random.default_rng(5).integers(0, len(patients), (n_boot, len(patients)))
    values: dict[str, list[float]] = {"accuracy": [], "balanced_accuracy": [], "f1": [], "auroc": [], "recall_b": []}
    for draw in draws:
        sample = pd.concat([frame[frame["patient_id"] == patients[i]] for i in draw])
        labels, predicted = sample["label"].to_numpy(), sample["pred"].to_numpy()
        values["accuracy"].append(accuracy_score(labels, predicted))
        values["balanced_accuracy"].append(balanced_accuracy_score(labels, predicted))
        values["f1"].append(f1_score(labels, predicted, average="macro", labels=[0, 1, 2], zero_division=0))
        values["recall_b"].append(recall_score(labels == 1, predicted == 1, zero_division=0))
        if len(set(labels)) == 3:
            values["auroc"].append(roc_auc_score(labels, sample[[f"prob_{n}" for n in NAMES]].to_numpy(), multi_class="ovr"))
    for name, replicate in values.items():
        low, high = np.quantile(replicate, [alpha / 2, 1 - alpha / 2])
        assert cis[name] == pytest.approx((low, high)), name
