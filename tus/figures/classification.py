"""Figures of a cross-validated binary classifier, from its pooled test predictions and logs.

``predictions`` is the table :func:`tus.eval.cv_summary.pooled_predictions` returns: one row
per test image and run, with ``label`` (0/1), ``prob`` (positive-class probability), ``pred``,
``fold``, ``seed`` and ``patient_id`` (the bootstrap's resampling unit).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from tus.eval.statistics import patient_bootstrap_cis, patient_replicate_rows, percentile_interval
from tus.figures.style import HEATMAP_CMAP, FigureData, colors, new_figure, style

CI_BOOTSTRAPS = 1000
CONFIDENCE = 0.95
GRID = np.linspace(0.0, 1.0, 101)
RUN_KEYS = ["seed", "fold"]


def _runs(predictions: pd.DataFrame):
    """(run name, its rows) per fold x seed, in (seed, fold) order."""
    for (seed, fold), rows in predictions.groupby(RUN_KEYS, sort=True):
        yield f"fold{int(fold)}-seed{int(seed)}", rows


def _two_classes(rows: pd.DataFrame) -> bool:
    return rows["label"].nunique() == 2


def _average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """sklearn's ``average_precision_score`` for binary labels, to the bit (its steps, in its
    order), without its input checks: those took ~1 ms of a bootstrap replicate's ~1.05 ms, and
    the patient bootstrap of a CV's PR figure runs 1000 replicates (most of a small CV's time)."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    ranked, hits = scores[order], positive[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]
    true_positives = np.cumsum(hits, dtype=np.float64)[last_of_each_score]
    predicted_positives = 1.0 + last_of_each_score
    precision = np.r_[(true_positives / predicted_positives)[::-1], 1.0]
    recall = np.r_[(true_positives / true_positives[-1])[::-1], 0.0]
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def _ci(predictions: pd.DataFrame, metric: str, n_boot: int) -> tuple[float, float]:
    """Patient-bootstrap CI of the pooled predictions (NaN, NaN when it cannot be computed)."""
    frame = predictions if "patient_id" in predictions else predictions.assign(patient_id=predictions["sample_id"])
    frame = frame.rename(columns={"probability": "prob"})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if metric == "average_precision":
                # patient_bootstrap_ci's replicates on arrays: a replicate's rows through pandas
                # cost ~2 ms, of 1000 replicates that were most of the PR figure's time.
                positive, scores = frame["label"].to_numpy() == 1, frame["prob"].to_numpy()
                replicates = patient_replicate_rows(frame["patient_id"].to_numpy(), n_boot, seed=0)
                values = [_average_precision(positive[rows], scores[rows]) if 0 < positive[rows].sum() < len(rows) else math.nan for rows in replicates]
                return percentile_interval(np.array(values), alpha=1 - CONFIDENCE)
            return patient_bootstrap_cis(frame, [metric], n_boot=n_boot, alpha=1 - CONFIDENCE, seed=0)[metric]
    except ValueError:
        return math.nan, math.nan


def _ci_text(value: float, ci: tuple[float, float]) -> str:
    interval = "" if math.isnan(ci[0]) else f" ({CONFIDENCE:.0%} CI {ci[0]:.2f}–{ci[1]:.2f})"
    return f"{value:.2f}{interval}"


def roc_data(predictions: pd.DataFrame, n_boot: int = CI_BOOTSTRAPS) -> pd.DataFrame:
    """ROC points per run (``curve`` = fold<F>-seed<S>; every threshold kept) and the mean curve
    (``curve`` = mean: TPR interpolated on a 0.01 FPR grid, averaged over runs, band = ± 1 std).

    ``auc`` is the run's AUROC, for the mean the mean of the runs' AUROCs; ``auc_ci_low/high``
    the patient-bootstrap CI of AUROC over the pooled predictions (mean row only).
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    tables, interpolated, aucs = [], [], []
    for name, rows in _runs(predictions):
        if not _two_classes(rows):
            continue
        fpr, tpr, _ = roc_curve(rows["label"], rows["prob"], drop_intermediate=False)
        auc = float(roc_auc_score(rows["label"], rows["prob"]))
        aucs.append(auc)
        interpolated.append(np.interp(GRID, fpr, tpr))
        tables.append(pd.DataFrame({"curve": name, "x": fpr, "y": tpr, "band_low": np.nan, "band_high": np.nan, "auc": auc, "auc_ci_low": np.nan, "auc_ci_high": np.nan}))
    if interpolated:
        stack = np.vstack(interpolated)
        mean, std = stack.mean(0), stack.std(0, ddof=1) if len(stack) > 1 else np.zeros(len(GRID))
        mean[0] = 0.0
        low, high = _ci(predictions, "auroc", n_boot)
        tables.append(
            pd.DataFrame(
                {"curve": "mean", "x": GRID, "y": mean, "band_low": (mean - std).clip(0, 1), "band_high": (mean + std).clip(0, 1), "auc": float(np.mean(aucs)), "auc_ci_low": low, "auc_ci_high": high}
            )
        )
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["curve", "x", "y", "band_low", "band_high", "auc", "auc_ci_low", "auc_ci_high"])


def pr_data(predictions: pd.DataFrame, n_boot: int = CI_BOOTSTRAPS) -> pd.DataFrame:
    """Precision-recall points per run and the mean curve (precision interpolated on a recall
    grid, step-wise as PR curves are drawn), ``auc`` = average precision (AP), mean row: the mean
    of the runs' APs with the patient-bootstrap CI of AP over the pooled predictions."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    tables, interpolated, aps = [], [], []
    for name, rows in _runs(predictions):
        if not _two_classes(rows):
            continue
        precision, recall, _ = precision_recall_curve(rows["label"], rows["prob"], drop_intermediate=False)
        ap = float(average_precision_score(rows["label"], rows["prob"]))
        aps.append(ap)
        order = np.argsort(recall, kind="stable")
        # The precision reached at recall r or beyond: the PR curve's step form.
        at_grid = [precision[recall >= r].max() for r in GRID]
        interpolated.append(np.array(at_grid))
        tables.append(pd.DataFrame({"curve": name, "x": recall[order], "y": precision[order], "band_low": np.nan, "band_high": np.nan, "auc": ap, "auc_ci_low": np.nan, "auc_ci_high": np.nan}))
    if interpolated:
        stack = np.vstack(interpolated)
        mean, std = stack.mean(0), stack.std(0, ddof=1) if len(stack) > 1 else np.zeros(len(GRID))
        low, high = _ci(predictions, "average_precision", n_boot)
        tables.append(
            pd.DataFrame(
                {"curve": "mean", "x": GRID, "y": mean, "band_low": (mean - std).clip(0, 1), "band_high": (mean + std).clip(0, 1), "auc": float(np.mean(aps)), "auc_ci_low": low, "auc_ci_high": high}
            )
        )
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["curve", "x", "y", "band_low", "band_high", "auc", "auc_ci_low", "auc_ci_high"])


@style
def curve_figure(data: pd.DataFrame, kind: str, positive_rate: float | None = None) -> FigureData:
    """Draw :func:`roc_data` (``kind`` roc) or :func:`pr_data` (``kind`` pr): runs thin, the mean
    bold with its ± 1 std band, the chance line; the legend gives AUROC/AP with its CI."""
    figure, axis = new_figure(3.0)
    runs = [c for c in data["curve"].unique() if c != "mean"]
    color = colors(2)[0]
    for index, name in enumerate(runs):
        rows = data[data["curve"] == name]
        draw = axis.step if kind == "pr" else axis.plot
        kwargs = {"where": "post"} if kind == "pr" else {}
        draw(rows["x"], rows["y"], color="0.6", linewidth=0.5, alpha=0.8, label=f"fold × seed runs (n = {len(runs)})" if index == 0 else None, **kwargs)
    mean = data[data["curve"] == "mean"]
    metric = "AP" if kind == "pr" else "AUROC"
    if len(mean):
        first = mean.iloc[0]
        axis.fill_between(mean["x"], mean["band_low"], mean["band_high"], color=color, alpha=0.25, linewidth=0, label="mean ± 1 std")
        axis.plot(mean["x"], mean["y"], color=color, linewidth=1.5, label=f"mean: {metric} {_ci_text(first['auc'], (first['auc_ci_low'], first['auc_ci_high']))}")
    if kind == "roc":
        axis.plot([0, 1], [0, 1], color="0.3", linestyle=":", linewidth=0.8, label="chance (AUROC 0.50)")
        axis.set_xlabel("false positive rate (1 − specificity)")
        axis.set_ylabel("true positive rate (sensitivity)")
        axis.legend(loc="lower right")
    else:
        if positive_rate is not None:
            axis.axhline(positive_rate, color="0.3", linestyle=":", linewidth=0.8, label=f"chance (AP {positive_rate:.2f})")
        axis.set_xlabel("recall (sensitivity)")
        axis.set_ylabel("precision (PPV)")
        axis.legend(loc="lower left")
    axis.set_xlim(-0.01, 1.01)
    axis.set_ylim(-0.01, 1.01)
    axis.set_aspect("equal")
    axis.set_title("ROC, test folds" if kind == "roc" else "Precision-recall, test folds")
    return FigureData(figure, data)


def roc_figure(predictions: pd.DataFrame, n_boot: int = CI_BOOTSTRAPS) -> FigureData:
    return curve_figure(roc_data(predictions, n_boot), "roc")


def pr_figure(predictions: pd.DataFrame, n_boot: int = CI_BOOTSTRAPS) -> FigureData:
    return curve_figure(pr_data(predictions, n_boot), "pr", positive_rate=float(predictions["label"].mean()))


def confusion_data(predictions: pd.DataFrame, classes: Sequence[str] = ("0", "1")) -> pd.DataFrame:
    """Counts of (true, predicted) summed over every run's test fold, and each row's share (%);
    K x K for K ``classes``."""
    rows = []
    for true in range(len(classes)):
        total = int((predictions["label"] == true).sum())
        for predicted in range(len(classes)):
            count = int(((predictions["label"] == true) & (predictions["pred"] == predicted)).sum())
            rows.append(
                {"true": true, "predicted": predicted, "true_name": classes[true], "predicted_name": classes[predicted], "count": count, "row_percent": 100.0 * count / total if total else math.nan}
            )
    return pd.DataFrame(rows)


@style
def confusion_figure_from_data(data: pd.DataFrame, runs: int) -> FigureData:
    k = int(data["true"].nunique())
    figure, axis = new_figure(2.8 if k == 2 else 1.2 + 0.9 * k)
    counts = data.pivot(index="true", columns="predicted", values="count").to_numpy()
    percent = data.pivot(index="true", columns="predicted", values="row_percent").to_numpy()
    image = axis.imshow(np.nan_to_num(percent), cmap=HEATMAP_CMAP, vmin=0, vmax=100)
    for (i, j), count in np.ndenumerate(counts):
        share = "n/a" if math.isnan(percent[i, j]) else f"{percent[i, j]:.1f}%"
        axis.text(j, i, f"{count}\n{share}", ha="center", va="center", color="white" if np.nan_to_num(percent[i, j]) < 60 else "black")
    names = data.drop_duplicates("true").sort_values("true")["true_name"].tolist()
    axis.set_xticks(list(range(k)), names)
    axis.set_yticks(list(range(k)), names)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(f"Confusion, summed over {runs} test folds × seeds")
    figure.colorbar(image, ax=axis, label="share of the true class (%)", shrink=0.8)
    return FigureData(figure, data)


def one_vs_rest(predictions: pd.DataFrame, k: int, name: str) -> pd.DataFrame:
    """K > 2 classes' pooled predictions as the binary task "class ``k`` or not" (``prob`` = its
    probability), for the binary curves: one ROC curve per class."""
    return predictions.assign(label=(predictions["label"] == k).astype(int), pred=(predictions["pred"] == k).astype(int), prob=predictions[f"prob_{name}"])


def confusion_figure(predictions: pd.DataFrame, classes: Sequence[str] = ("0", "1")) -> FigureData:
    runs = predictions[RUN_KEYS].drop_duplicates().shape[0]
    return confusion_figure_from_data(confusion_data(predictions, classes), runs)


def calibration_data(predictions: pd.DataFrame, bins: int = 10) -> pd.DataFrame:
    """Reliability table on ``bins`` equal-width bins of the positive-class probability (the last
    bin closed): count, mean predicted probability, observed positive fraction; ``ece`` (the same
    on every row) = sum over bins of count/N * |observed - predicted|."""
    prob = predictions["prob"].to_numpy(dtype=float)
    label = predictions["label"].to_numpy(dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(prob, edges[1:-1], right=False), 0, bins - 1)
    rows = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        rows.append(
            {
                "bin_low": edges[b],
                "bin_high": edges[b + 1],
                "count": count,
                "mean_predicted": float(prob[members].mean()) if count else math.nan,
                "fraction_positive": float(label[members].mean()) if count else math.nan,
            }
        )
    table = pd.DataFrame(rows)
    used = table[table["count"] > 0]
    ece = float((used["count"] / used["count"].sum() * (used["fraction_positive"] - used["mean_predicted"]).abs()).sum()) if len(used) else math.nan
    return table.assign(ece=ece)


@style
def calibration_figure_from_data(data: pd.DataFrame) -> FigureData:
    figure, (axis, counts) = new_figure(3.4, nrows=2, sharex=True, height_ratios=[3, 1])
    color = colors(2)[0]
    used = data[data["count"] > 0]
    width = float((data["bin_high"] - data["bin_low"]).iloc[0])
    axis.plot([0, 1], [0, 1], color="0.3", linestyle=":", linewidth=0.8, label="perfectly calibrated")
    axis.bar(used["bin_low"], used["fraction_positive"], width=width, align="edge", color=color, alpha=0.35, edgecolor=color, label="observed, per bin")
    axis.plot(used["mean_predicted"], used["fraction_positive"], marker="o", markersize=3, color=color, label="(mean predicted, observed)")
    ece = float(data["ece"].iloc[0])
    axis.set_title(f"Reliability, pooled test folds: ECE {ece:.3f}")
    axis.set_ylabel("observed positive fraction")
    axis.set_ylim(0, 1)
    axis.legend(loc="best")
    counts.bar(data["bin_low"], data["count"], width=width, align="edge", color="0.5")
    counts.set_ylabel("images")
    counts.set_xlabel("predicted probability of class 1")
    counts.set_xlim(0, 1)
    return FigureData(figure, data)


def calibration_figure(predictions: pd.DataFrame, bins: int = 10) -> FigureData:
    return calibration_figure_from_data(calibration_data(predictions, bins))


def training_curves_data(logs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per-epoch losses of each run from its Lightning ``metrics.csv`` (run name -> table):
    long format ``run, epoch, split (train/val), loss`` (epoch-level rows only)."""
    rows = []
    for run, log in logs.items():
        for split, column in (("train", "train/loss_epoch"), ("val", "val/loss")):
            if column not in log or "epoch" not in log:
                continue
            values = log[["epoch", column]].dropna().groupby("epoch", as_index=False)[column].last()
            rows.append(pd.DataFrame({"run": run, "epoch": values["epoch"].astype(int), "split": split, "loss": values[column].astype(float)}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["run", "epoch", "split", "loss"])


@style
def training_curves_figure_from_data(data: pd.DataFrame) -> FigureData:
    figure, axis = new_figure(2.6)
    runs = sorted(data["run"].unique())
    palette = colors(len(runs))
    for color, run in zip(palette, runs):
        for split, style_ in (("train", "-"), ("val", "--")):
            rows = data[(data["run"] == run) & (data["split"] == split)].sort_values("epoch")
            if len(rows):
                axis.plot(rows["epoch"] + 1, rows["loss"], linestyle=style_, color=color, marker="." if len(rows) < 15 else None, label=f"{run} {split}")
    axis.set_xlabel("epoch")
    axis.set_ylabel("cross-entropy loss (nats)")
    has_val = (data["split"] == "val").any()
    axis.set_title("Training loss per fold × seed" + (" (dashed: inner validation)" if has_val else ""))
    if runs:
        axis.legend(ncols=2 if len(runs) > 3 else 1, fontsize=5)
    return FigureData(figure, data)


def training_curves_figure(logs: dict[str, pd.DataFrame]) -> FigureData:
    return training_curves_figure_from_data(training_curves_data(logs))
