"""Decision thresholds chosen on out-of-fold predictions: pure functions, no I/O.

A binary classifier predicts the positive class when its positive-class probability is at or
above a threshold ``t`` (``p >= t``). The rule that picks ``t``:

- ``"0.5"`` (or any number in (0, 1)): that fixed threshold;
- ``"youden"``: the ``t`` maximising Youden's J = sensitivity + specificity - 1 on the given
  predictions (ties: the highest such ``t``);
- ``"sensitivity=0.9"``: the highest ``t`` whose sensitivity (recall) is at least 0.9;
- ``"specificity=0.9"``: the lowest ``t`` whose specificity is at least 0.9.

Candidate thresholds are the observed probabilities (every distinct operating point of the ROC
curve). In cross-validation a threshold for the model of test fold ``k`` must not see fold ``k``:
:func:`out_of_fold_thresholds` picks it on the out-of-fold predictions of the other folds (the
CV's ``predictions.csv`` of the other folds' runs: predictions on fold ``k``'s *training*
images by models that did not train on those images).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from tus.eval.options import DEFAULT_THRESHOLD as DEFAULT_THRESHOLD
from tus.eval.options import RULE_KINDS as RULE_KINDS
from tus.eval.options import ThresholdRule as ThresholdRule
from tus.eval.options import parse_threshold_rule as parse_threshold_rule

if TYPE_CHECKING:  # the config's validation imports this module: keep it light
    import pandas as pd


def _operating_points(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds descending, sensitivity, specificity) at every distinct observed probability (``p >= t``)."""
    labels = np.asarray(labels).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        raise ValueError(f"choosing a threshold needs both classes; got {int(positives)} positive and {int(negatives)} negative prediction(s)")
    thresholds = np.unique(probs)[::-1]
    order = np.argsort(-probs, kind="stable")
    sorted_probs, sorted_labels = probs[order], labels[order]
    # Predictions at or above each threshold: a right-inclusive search on the descending scores.
    counts = np.searchsorted(-sorted_probs, -thresholds, side="right")
    true_positives = np.concatenate([[0], np.cumsum(sorted_labels)])[counts]
    false_positives = counts - true_positives
    return thresholds, true_positives / positives, 1.0 - false_positives / negatives


def choose_threshold(rule: ThresholdRule | str, labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold ``rule`` picks on (``labels``, positive-class ``probs``)."""
    rule = parse_threshold_rule(rule) if isinstance(rule, str) else rule
    if rule.kind == "fixed":
        return float(rule.value)
    thresholds, sensitivity, specificity = _operating_points(labels, probs)
    if rule.kind == "youden":
        return float(thresholds[int(np.argmax(sensitivity + specificity - 1.0))])  # first = highest t among ties
    if rule.kind == "sensitivity":
        reached = np.flatnonzero(sensitivity >= rule.value - 1e-12)
        return float(thresholds[reached[0]])  # the lowest threshold always reaches sensitivity 1
    reached = np.flatnonzero(specificity >= rule.value - 1e-12)
    if len(reached) == 0:
        raise ValueError(f"no threshold reaches specificity {rule.value:g} on these predictions")
    return float(thresholds[reached[-1]])


def out_of_fold_thresholds(predictions: pd.DataFrame, rule: ThresholdRule | str) -> dict[tuple[int, int], float]:
    """The threshold of each (fold, seed) run, chosen on the other folds' out-of-fold predictions of the same seed.

    ``predictions``: the CV's pooled test predictions with ``fold``, ``seed``, ``label`` and ``prob``
    (:func:`tus.eval.cv_summary.pooled_predictions`). The run's own test fold never takes part.
    """
    rule = parse_threshold_rule(rule) if isinstance(rule, str) else rule
    chosen = {}
    for (fold, seed), _ in predictions.groupby(["fold", "seed"]):
        others = predictions[(predictions["seed"] == seed) & (predictions["fold"] != fold)]
        chosen[(int(fold), int(seed))] = choose_threshold(rule, others["label"].to_numpy(), others["prob"].to_numpy()) if rule.needs_data else float(rule.value)
    return chosen


def confusion_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, F1, precision, recall (sensitivity) and specificity at ``p >= threshold`` (0 where undefined, as torchmetrics)."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(probs, dtype=np.float64) >= threshold
    tp, fp = float((labels & predicted).sum()), float((~labels & predicted).sum())
    fn, tn = float((labels & ~predicted).sum()), float((~labels & ~predicted).sum())
    return {
        "accuracy": (tp + tn) / max(tp + tn + fp + fn, 1.0),
        "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else 0.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
    }
