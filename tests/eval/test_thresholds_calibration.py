"""Decision thresholds and temperature scaling, against brute force and written-out formulas."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tus.eval.calibration import apply_temperature, expected_calibration_error, fit_temperature, out_of_fold_temperatures
from tus.eval.thresholds import choose_threshold, confusion_metrics, out_of_fold_thresholds, parse_threshold_rule


def brute_force_youden(labels, probs) -> float:
    """Try every observed probability as threshold (p >= t); keep the highest t of the best J."""
    best, best_t = -np.inf, None
    for t in sorted(set(probs), reverse=True):
        tp = sum(1 for y, p in zip(labels, probs) if y == 1 and p >= t)
        tn = sum(1 for y, p in zip(labels, probs) if y == 0 and p < t)
        j = tp / sum(labels) + tn / (len(labels) - sum(labels)) - 1
        if j > best + 1e-12:
            best, best_t = j, t
    return best_t


def test_youden_and_sensitivity_match_brute_force():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(0.3 * labels + rng.normal(0.35, 0.2, 200), 0, 1).round(3)  # rounding makes ties
    assert choose_threshold("youden", labels, probs) == pytest.approx(brute_force_youden(labels.tolist(), probs.tolist()))
    t = choose_threshold("sensitivity=0.9", labels, probs)
    recall = lambda th: ((probs >= th) & (labels == 1)).sum() / labels.sum()  # noqa: E731
    assert recall(t) >= 0.9
    assert all(recall(u) < 0.9 for u in np.unique(probs) if u > t)  # the highest such threshold
    s = choose_threshold("specificity=0.8", labels, probs)
    specificity = lambda th: ((probs < th) & (labels == 0)).sum() / (labels == 0).sum()  # noqa: E731
    assert specificity(s) >= 0.8 and all(specificity(u) < 0.8 for u in np.unique(probs) if u < s)


def test_rule_parsing_refuses_nonsense():
    assert parse_threshold_rule("0.3").value == 0.3 and str(parse_threshold_rule("Sensitivity=0.95")) == "sensitivity=0.95"
    for bad in ("1.5", "youdon", "sensitivity=0", "recall=0.9"):
        with pytest.raises(ValueError, match="threshold"):
            parse_threshold_rule(bad)


def test_youden_of_a_fold_uses_only_its_training_folds_with_a_planted_test_fold_shift():
    rng = np.random.default_rng(0)
    rows = []
    for fold in range(3):
        labels = rng.integers(0, 2, 60)
        probs = 0.25 + 0.3 * labels + rng.uniform(-0.2, 0.2, 60)
        if fold == 0:
            probs = probs + 0.35  # fold 0's predictions are shifted: its own best threshold sits far higher
        rows.append(pd.DataFrame({"fold": fold, "seed": 0, "label": labels, "prob": probs}))
    predictions = pd.concat(rows, ignore_index=True)
    chosen = out_of_fold_thresholds(predictions, "youden")
    others = predictions[predictions["fold"] != 0]
    assert chosen[(0, 0)] == pytest.approx(brute_force_youden(others["label"].tolist(), others["prob"].tolist()))
    own = predictions[predictions["fold"] == 0]
    assert brute_force_youden(own["label"].tolist(), own["prob"].tolist()) > chosen[(0, 0)] + 0.2  # the test fold was not looked at
    # Folds 1 and 2 see fold 0's shifted predictions among their training folds' ones.
    for fold in (1, 2):
        rest = predictions[predictions["fold"] != fold]
        assert chosen[(fold, 0)] == pytest.approx(brute_force_youden(rest["label"].tolist(), rest["prob"].tolist()))


def test_confusion_metrics_by_hand():
    labels = np.array([1, 1, 0, 0, 0])
    probs = np.array([0.9, 0.4, 0.6, 0.2, 0.1])
    m = confusion_metrics(labels, probs, 0.5)  # tp 1, fn 1, fp 1, tn 2
    assert m == pytest.approx({"accuracy": 3 / 5, "f1": 2 / 4, "precision": 1 / 2, "recall": 1 / 2, "specificity": 2 / 3})


def test_temperature_recovers_a_planted_temperature():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 4, 20000)
    labels = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-z / 2.5))).astype(int)  # true probabilities sigmoid(z / 2.5)
    assert fit_temperature(z, labels) == pytest.approx(2.5, rel=0.05)
    p = 1 / (1 + np.exp(-z))
    assert apply_temperature(p[:3], 2.5) == pytest.approx(1 / (1 + np.exp(-z[:3] / 2.5)), rel=1e-6)


def test_out_of_fold_temperature_ignores_the_test_fold():
    rng = np.random.default_rng(2)
    frames = []
    for fold, scale in ((0, 0.2), (1, 3.0), (2, 3.0)):
        z = rng.normal(0, 3, 3000)
        labels = (rng.uniform(size=z.size) < 1 / (1 + np.exp(-z / scale))).astype(int)
        frames.append(pd.DataFrame({"fold": fold, "seed": 0, "label": labels, "prob": 1 / (1 + np.exp(-z))}))
    fitted = out_of_fold_temperatures(pd.concat(frames, ignore_index=True))
    assert fitted[(0, 0)] == pytest.approx(3.0, rel=0.1)  # from folds 1 and 2 only


def test_ece_by_hand():
    # Two bins used: confidences 0.9 (2 right of 2) and 0.6 (1 right of 2) -> 0.5 * 0.1 + 0.5 * 0.1.
    probs = np.array([0.9, 0.1, 0.6, 0.4])  # positive-class probabilities; confidences 0.9, 0.9, 0.6, 0.6
    labels = np.array([1, 0, 1, 1])
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.5 * 0.1 + 0.5 * 0.1)
