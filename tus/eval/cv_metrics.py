"""The test metrics every fold x seed run of a binary classifier records, in table order.

Shared by the classifier that computes them (:mod:`tus.methods.classifier`) and the summaries
that aggregate them (:mod:`tus.eval.cv_summary`), here below both so imports go one way.
"""

from __future__ import annotations

METRIC_NAMES = ("accuracy", "f1", "precision", "recall", "auroc")
