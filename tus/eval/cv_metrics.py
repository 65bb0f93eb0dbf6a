"""The test metrics every fold x seed run of a classifier records, in table order.

Shared by the classifier that computes them (:mod:`tus.methods.classifier`) and the summaries
that aggregate them (:mod:`tus.eval.cv_summary`), here below both so imports go one way.

Binary (K = 2): :data:`METRIC_NAMES` of the positive class 1. K > 2 classes: accuracy, balanced
accuracy and the macro (unweighted mean over classes) F1, precision, recall and one-vs-rest AUROC
(:data:`MULTICLASS_METRIC_NAMES`), then each class's one-vs-rest F1, precision, recall and AUROC
(``<metric>_<class name>``, :func:`per_class_metric_names`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

METRIC_NAMES = ("accuracy", "f1", "precision", "recall", "auroc")
MULTICLASS_METRIC_NAMES = ("accuracy", "balanced_accuracy", "f1", "precision", "recall", "auroc")
PER_CLASS_METRICS = ("f1", "precision", "recall", "auroc")
# Predictions of a K > 2 classifier have one probability column per class, this prefix + its name.
PROBABILITY_PREFIX = "prob_"


def is_multiclass(label_names: Sequence[str] | None) -> bool:
    return label_names is not None and len(label_names) > 2


def per_class_metric_names(label_names: Sequence[str]) -> list[str]:
    return [f"{metric}_{name}" for name in label_names for metric in PER_CLASS_METRICS]


def metric_names(label_names: Sequence[str] | None = None) -> tuple[str, ...]:
    """Every metric a run records: the binary five, or for K > 2 the macro ones and the per-class ones."""
    if not is_multiclass(label_names):
        return METRIC_NAMES
    assert label_names is not None
    return (*MULTICLASS_METRIC_NAMES, *per_class_metric_names(label_names))


def probability_columns(label_names: Sequence[str]) -> list[str]:
    return [f"{PROBABILITY_PREFIX}{name}" for name in label_names]


def multiclass_metrics(labels: np.ndarray, probabilities: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
    """:func:`metric_names` of K > 2 classes from labels (N,) and class probabilities (N, K); the
    prediction is the most probable class. Precision, recall and F1 of a class never predicted
    (or absent) are 0, as torchmetrics reports them; a class's AUROC is NaN when the test set has
    none (or only) of it, and macro AUROC is then the mean over the classes where it is defined."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, precision_recall_fscore_support, roc_auc_score

    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    classes = list(range(len(label_names)))
    predictions = probabilities.argmax(1)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, labels=classes, zero_division=0)
    aurocs = [float(roc_auc_score(labels == k, probabilities[:, k])) if 0 < (labels == k).sum() < len(labels) else math.nan for k in classes]
    defined = [a for a in aurocs if not math.isnan(a)]
    out = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "f1": float(np.mean(f1)),
        "precision": float(np.mean(precision)),
        "recall": float(np.mean(recall)),
        "auroc": float(np.mean(defined)) if defined else math.nan,
    }
    for k, name in enumerate(label_names):
        out.update({f"f1_{name}": float(f1[k]), f"precision_{name}": float(precision[k]), f"recall_{name}": float(recall[k]), f"auroc_{name}": aurocs[k]})
    return out
