"""Statistics for cross-validated results: spreads, paired arm comparisons and patient-level CIs.

tus evaluates every arm with patient-grouped K-fold cross-validation repeated over several
seeds. Each run (fold, seed) gives one row of test metrics (a *runs table*: columns ``fold``,
``seed`` and one column per metric) and the pooled test predictions (``sample_id``,
``patient_id``, ``label``, ``prob``, ``pred``, ``fold``, ``seed``). This module turns those into
what a reviewer asks for:

* :func:`paper_spread` -- mean and standard deviation the way the reference paper reports them,
  next to the plain sample standard deviation over all runs, so a table can say which it shows.
* :func:`nadeau_bengio_ttest` / :func:`compare_arms` -- the corrected resampled t-test
  (Nadeau & Bengio 2003, "Inference for the generalization error", Machine Learning 52;
  Bouckaert & Frank 2004, "Evaluating the replicability of significance tests for comparing
  learning algorithms", PAKDD), for folds re-drawn per seed. Runs of one cross-validation share
  most of their training data, so their scores are positively correlated and the ordinary paired
  t-test is far too liberal; the correction inflates the variance of the mean difference.
* :func:`compare_pooled_predictions` -- for one split shared by every seed (the runs are then not
  resampled splits): a patient bootstrap of the paired metric difference on pooled predictions.
* :func:`check_same_test_sets` -- two arms are only compared when each run tested both on the
  same images (their ``folds.csv``).
* :func:`patient_bootstrap_ci` -- a percentile bootstrap over patients (clusters): images of one
  patient are correlated, so resampling images would understate the uncertainty.
* :func:`format_p` / :func:`significance_marker` -- p-values and stars for rendered tables.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

RUN_KEYS = ("fold", "seed")
# Metrics whose paper spread is taken over all fold x seed runs; every other metric's spread is
# taken over the per-seed means (see :func:`paper_spread`).
RUN_LEVEL_METRICS = ("accuracy",)

MetricFn = Callable[[pd.DataFrame], float]


def paper_spread(runs: pd.DataFrame, metrics: Iterable[str], run_level_metrics: Sequence[str] = RUN_LEVEL_METRICS) -> dict[str, dict]:
    """Mean and standard deviations of each metric over a fold x seed runs table.

    The reference paper (TesticulUS, 3-fold CV x 4 seeds) reports accuracy as mean +- std over
    all runs, but F1, precision and recall as mean +- std over the per-seed means (first the mean
    over the folds of each seed, then the std over seeds). Both spreads use the sample standard
    deviation (ddof=1). For each metric this returns:

    * ``mean`` -- mean over all runs (equal to the mean of the seed means when every seed has the
      same number of folds);
    * ``std`` -- the paper's spread: over all runs for ``run_level_metrics``, else over seed means;
    * ``std_over`` -- ``"runs"`` or ``"seed_means"``, which of the two ``std`` is;
    * ``sample_std`` -- sample std (ddof=1) over all runs, whatever the metric;
    * ``n_runs`` / ``n_seeds`` -- how many values each spread saw.

    A standard deviation of a single value is undefined and returned as NaN (one run, or one
    seed for a seed-mean spread). Missing metric values (NaN) are skipped, as pandas does.
    """
    missing = [name for name in (*RUN_KEYS, *metrics) if name not in runs.columns]
    if missing:
        raise ValueError(f"runs table lacks columns {missing}; it has {list(runs.columns)}")
    summary: dict[str, dict] = {}
    for name in metrics:
        values = runs[name].dropna()
        seed_means = runs.groupby("seed")[name].mean().dropna()
        sample_std = float(values.std(ddof=1))
        over_runs = name in run_level_metrics
        summary[name] = {
            "mean": float(values.mean()),
            "std": sample_std if over_runs else float(seed_means.std(ddof=1)),
            "std_over": "runs" if over_runs else "seed_means",
            "sample_std": sample_std,
            "n_runs": len(values),
            "n_seeds": len(seed_means),
        }
    return summary


def nadeau_bengio_ttest(diffs: Sequence[float] | np.ndarray, n_train: float, n_test: float) -> tuple[float, float]:
    """Corrected resampled t-test on paired per-run differences (two-sided).

    Nadeau & Bengio (2003), Eq. for the corrected resampled t-statistic, as popularised by
    Bouckaert & Frank (2004): with J paired differences d_j between two learners evaluated on the
    same train/test splits,

        sigma2_corrected = (1/J + n_test/n_train) * var(d, ddof=1),
        t = mean(d) / sqrt(sigma2_corrected),

    and p = 2 * P(T_{J-1} > |t|) for Student's t with J-1 degrees of freedom. ``n_train`` and
    ``n_test`` are the training and test set sizes of one run (for grouped folds of unequal size,
    their averages over the runs). The term n_test/n_train = rho/(1-rho) accounts for the
    correlation rho = n_test/(n_train+n_test) between runs that share training data.

    Zero variance (every difference equal) has no t-statistic; it is resolved as the limit of the
    test: a zero mean gives t=0, p=1 (no evidence of a difference) and a non-zero mean gives
    t=+-inf, p=0 (scipy's ``ttest_1samp`` yields NaN there instead, which would break tables).
    """
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need a 1-D sequence of at least 2 differences, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("differences must be finite")
    if n_train <= 0 or n_test <= 0:
        raise ValueError(f"n_train and n_test must be positive, got {n_train} and {n_test}")
    j = len(d)
    mean = float(d.mean())
    variance = float(d.var(ddof=1))
    if variance == 0.0:
        if mean == 0.0:
            return 0.0, 1.0
        return math.copysign(math.inf, mean), 0.0
    t = mean / math.sqrt((1.0 / j + n_test / n_train) * variance)
    p = float(2.0 * stats.t.sf(abs(t), df=j - 1))
    return float(t), p


class UnpairedRunsError(ValueError):
    """Two arms' runs cannot be paired: their (fold, seed) runs differ, or were tested on different images."""


def check_same_test_sets(baseline_folds: pd.DataFrame, arm_folds: pd.DataFrame, runs: Iterable[tuple[int, int]], names: tuple[str, str] = ("baseline", "arm")) -> dict:
    """Refuse (:class:`UnpairedRunsError`, one line naming both arms) unless every run
    (fold, seed) of ``runs`` tested both arms on the same sample ids, as their ``folds.csv``
    tables say. Returns ``{"runs": n, "label_changes": m}``: m test rows whose label differs
    between the two tables (an arm tested on relabelled images, e.g. the reference protocol's
    flipped labels: paired on images, not on labels)."""
    from tus.data.folds import images_tested

    runs = sorted({(int(f), int(s)) for f, s in runs})
    seeds = sorted({s for _, s in runs})
    base, arm = images_tested(baseline_folds, seeds), images_tested(arm_folds, seeds)
    differing = [(key, base.get(key, frozenset()), arm.get(key, frozenset())) for key in runs if base.get(key, frozenset()) != arm.get(key, frozenset())]
    if differing:
        (fold, seed), only_base, only_arm = differing[0][0], differing[0][1] - differing[0][2], differing[0][2] - differing[0][1]
        example = "; ".join(f"{len(ids)} image(s) only in '{name}' (e.g. {', '.join(sorted(ids)[:3])})" for name, ids in ((names[0], only_base), (names[1], only_arm)) if ids)
        raise UnpairedRunsError(
            f"arms '{names[0]}' and '{names[1]}' were not tested on the same images in {len(differing)} of {len(runs)} runs "
            f"(fold {fold}, seed {seed}: {example}), so their runs are not paired; run both on one fold table (data.folds_from)"
        )
    changed = 0
    if "label" in baseline_folds.columns and "label" in arm_folds.columns:
        labels = {}
        for table, side in ((baseline_folds, 0), (arm_folds, 1)):
            key = table["sample_id"].astype(str) + ("/" + table["seed"].astype(str) if "seed" in table.columns else "")
            labels[side] = pd.Series(table["label"].to_numpy(), index=key.to_numpy())
        if ("seed" in baseline_folds.columns) == ("seed" in arm_folds.columns):
            common = labels[0].index.intersection(labels[1].index)
            changed = int((labels[0].loc[common] != labels[1].loc[common]).sum())
            if "seed" in baseline_folds.columns:  # the same image is tested once per seed
                changed = int(round(changed / max(baseline_folds["seed"].nunique(), 1)))
    return {"runs": len(runs), "label_changes": changed}


def _paired_runs(baseline_runs: pd.DataFrame, arm_runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Join the two runs tables on (fold, seed); ValueError naming every unmatched or repeated run."""
    for label, table in (("baseline", baseline_runs), ("arm", arm_runs)):
        missing = [name for name in (*RUN_KEYS, metric) if name not in table.columns]
        if missing:
            raise ValueError(f"{label} runs table lacks columns {missing}")
        repeated = table[table.duplicated(list(RUN_KEYS), keep=False)]
        if len(repeated):
            pairs = sorted({(int(f), int(s)) for f, s in zip(repeated["fold"], repeated["seed"])})
            raise ValueError(f"{label} runs table repeats (fold, seed) pairs {pairs}")
    base_keys = {(int(f), int(s)) for f, s in zip(baseline_runs["fold"], baseline_runs["seed"])}
    arm_keys = {(int(f), int(s)) for f, s in zip(arm_runs["fold"], arm_runs["seed"])}
    if base_keys != arm_keys:
        raise UnpairedRunsError(f"runs do not pair on (fold, seed): missing from arm {sorted(base_keys - arm_keys)}, missing from baseline {sorted(arm_keys - base_keys)}")
    left = baseline_runs[[*RUN_KEYS, metric]].rename(columns={metric: "baseline"})
    right = arm_runs[[*RUN_KEYS, metric]].rename(columns={metric: "arm"})
    return left.merge(right, on=list(RUN_KEYS), validate="one_to_one").sort_values(list(RUN_KEYS))


def compare_arms(
    baseline_runs: pd.DataFrame,
    arm_runs: pd.DataFrame,
    metric: str,
    n_train: float,
    n_test: float,
    confidence: float = 0.95,
    *,
    baseline_folds: pd.DataFrame | None = None,
    arm_folds: pd.DataFrame | None = None,
    names: tuple[str, str] = ("baseline", "arm"),
) -> dict:
    """Compare an arm with a baseline on one metric over runs paired by (fold, seed): the
    statistics for folds re-drawn per seed (repeated K-fold CV, several splits).

    Differences are ``arm - baseline`` per run. The p-value is the corrected resampled t-test
    (:func:`nadeau_bengio_ttest`) and the interval its inversion, mean -+ t_{J-1} * sqrt((1/J +
    n_test/n_train) * var): the range the test does not reject. With ``baseline_folds`` and
    ``arm_folds`` (the arms' ``folds.csv``) runs tested on different images are refused
    (:func:`check_same_test_sets`); unmatched (fold, seed) runs always are.
    """
    paired = _paired_runs(baseline_runs, arm_runs, metric)
    pairing = {"runs": len(paired), "label_changes": 0}
    if baseline_folds is not None and arm_folds is not None:
        pairing = check_same_test_sets(baseline_folds, arm_folds, zip(paired["fold"], paired["seed"]), names)
    diffs = (paired["arm"] - paired["baseline"]).to_numpy(dtype=float)
    t, p = nadeau_bengio_ttest(diffs, n_train, n_test)
    j = len(diffs)
    half = float(stats.t.ppf(0.5 + confidence / 2, df=j - 1) * math.sqrt((1.0 / j + n_test / n_train) * diffs.var(ddof=1)))
    return {
        "metric": metric,
        "test": "nadeau_bengio",
        "n_pairs": j,
        "label_changes": pairing["label_changes"],
        "baseline_mean": float(paired["baseline"].mean()),
        "arm_mean": float(paired["arm"].mean()),
        "mean_diff": float(diffs.mean()),
        "t": t,
        "p": p,
        "ci_low": float(diffs.mean()) - half,
        "ci_high": float(diffs.mean()) + half,
        "confidence": confidence,
    }


def compare_pooled_predictions(
    baseline_predictions: pd.DataFrame,
    arm_predictions: pd.DataFrame,
    metric: str,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    names: tuple[str, str] = ("baseline", "arm"),
) -> dict:
    """Patient bootstrap of the paired difference ``metric(arm) - metric(baseline)`` on the test
    predictions pooled over all runs: the statistics for one split shared by every seed, where
    the runs are not resampled splits and the corrected t-test does not apply.

    Both arms must hold the same (sample_id, fold, seed) rows. Each replicate draws the patients
    with replacement (all their rows, in both arms alike: the pairing is kept) and recomputes both
    arms' metric (:func:`replicate_metrics`, patients ordered by ``np.unique``, draws
    ``rng.integers(0, n_patients, (n_boot, n_patients))`` from ``default_rng(seed)``). The interval
    is the percentile interval of the replicate differences (NaN replicates skipped) and the
    two-sided p-value ``min(1, 2 * min(#(d* <= 0) + 1, #(d* >= 0) + 1) / (B + 1))``, which is
    below 1 - confidence exactly when the percentile interval excludes 0 (up to the +1s).

    It is conditional on the split and the trained models: it covers which patients were
    tested, not how the split or the training would vary.
    """
    keys = ["sample_id", "fold", "seed"]
    merged = baseline_predictions.merge(arm_predictions, on=keys, how="outer", suffixes=("_base", "_arm"), indicator=True)
    unmatched = merged[merged["_merge"] != "both"]
    if len(unmatched):
        row = unmatched.iloc[0]
        side = names[0] if row["_merge"] == "left_only" else names[1]
        raise UnpairedRunsError(
            f"arms '{names[0]}' and '{names[1]}' have different test predictions ({len(unmatched)} row(s) in one only, e.g. sample {row['sample_id']} of fold {row['fold']}, seed {row['seed']} only in '{side}'), so they are not paired"
        )
    counts, codes = patient_resample_counts(merged["patient_id_base"].astype(str).to_numpy(), n_boot, seed)
    sides = {side: merged[[f"{c}_{side}" for c in ("label", "prob", "pred")]].set_axis(["label", "prob", "pred"], axis=1) for side in ("base", "arm")}
    values = {side: replicate_metrics(frame, [metric], counts, codes)[metric] for side, frame in sides.items()}
    diffs = values["arm"] - values["base"]
    diffs = diffs[~np.isnan(diffs)]
    if len(diffs) == 0:
        raise ValueError(f"{metric} is undefined (NaN) on every bootstrap replicate")
    low, high = np.quantile(diffs, [0.5 - confidence / 2, 0.5 + confidence / 2])
    tail = min(int((diffs <= 0).sum()), int((diffs >= 0).sum()))
    base_value, arm_value = METRIC_FNS[metric](sides["base"]), METRIC_FNS[metric](sides["arm"])
    label_changes = int((sides["base"]["label"] != sides["arm"]["label"]).sum() / max(merged["seed"].nunique(), 1))
    return {
        "metric": metric,
        "test": "patient_bootstrap",
        "n_pairs": int(merged[["fold", "seed"]].drop_duplicates().shape[0]),
        "patients": counts.shape[1],
        "label_changes": label_changes,
        "baseline_mean": base_value,
        "arm_mean": arm_value,
        "mean_diff": arm_value - base_value,
        "p": float(min(1.0, 2 * (tail + 1) / (len(diffs) + 1))),
        "ci_low": float(low),
        "ci_high": float(high),
        "confidence": confidence,
        "n_boot": len(diffs),
    }


def accuracy_metric(frame: pd.DataFrame) -> float:
    """Accuracy of ``pred`` against ``label``."""
    return float(accuracy_score(frame["label"], frame["pred"]))


def f1_metric(frame: pd.DataFrame) -> float:
    """F1 of the positive class; 0 when undefined, as torchmetrics' BinaryF1Score reports it."""
    return float(f1_score(frame["label"], frame["pred"], zero_division=0))


def precision_metric(frame: pd.DataFrame) -> float:
    """Precision of the positive class; 0 when nothing is predicted positive (as torchmetrics)."""
    return float(precision_score(frame["label"], frame["pred"], zero_division=0))


def recall_metric(frame: pd.DataFrame) -> float:
    """Recall (sensitivity) of the positive class; 0 when there are no positives (as torchmetrics)."""
    return float(recall_score(frame["label"], frame["pred"], zero_division=0))


def auroc_metric(frame: pd.DataFrame) -> float:
    """AUROC of ``prob`` against ``label``; NaN when only one class is present (it is undefined)."""
    if frame["label"].nunique() < 2:
        return math.nan
    return float(roc_auc_score(frame["label"], frame["prob"]))


METRIC_FNS: dict[str, MetricFn] = {
    "accuracy": accuracy_metric,
    "f1": f1_metric,
    "precision": precision_metric,
    "recall": recall_metric,
    "auroc": auroc_metric,
}


def patient_bootstrap_ci(predictions: pd.DataFrame, metric_fn: MetricFn, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of a metric over pooled test predictions, resampling patients.

    Patients are the resampling unit (a cluster bootstrap): each replicate draws as many patients
    as there are, with replacement, and every row of a drawn patient comes along (all its images,
    and with predictions pooled over seeds all its seeds' rows), once per draw. The metric is
    recomputed on the replicate and the interval is the (alpha/2, 1-alpha/2) quantiles of the
    replicates (numpy's default linear interpolation).

    Replicates whose metric is NaN are skipped -- for AUROC, a replicate holding patients of one
    class only -- and a warning says how many; the quantiles are taken over the rest. Skipping
    conditions on both classes being drawn, which is what an AUROC interval can mean.

    Reproducible definition (so a reference can be written by hand): patients are ordered by
    ``np.unique(predictions["patient_id"])``; ``rng = np.random.default_rng(seed)`` draws the
    patient indices of all replicates at once, ``rng.integers(0, n_patients, (n_boot, n_patients))``;
    replicate b is ``predictions`` restricted to the rows of those patients, in draw order.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    replicates = patient_replicate_rows(predictions["patient_id"].to_numpy(), n_boot, seed)
    return percentile_interval(np.array([metric_fn(predictions.iloc[rows]) for rows in replicates]), alpha)


def patient_replicate_rows(patient_ids: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """The positional rows of each replicate of :func:`patient_bootstrap_ci` (its reproducible
    definition): for a metric computed on arrays rather than a frame's rows."""
    if len(patient_ids) == 0:
        raise ValueError("no predictions to bootstrap")
    patients, codes = np.unique(patient_ids, return_inverse=True)
    order = np.argsort(codes, kind="stable")
    # rows_of[i] are the positional rows of patient i, in their original order.
    rows_of = np.split(order, np.cumsum(np.bincount(codes, minlength=len(patients)))[:-1])
    draws = np.random.default_rng(seed).integers(0, len(patients), (n_boot, len(patients)))
    return [np.concatenate([rows_of[i] for i in draw]) for draw in draws]


def percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """The (alpha/2, 1-alpha/2) quantiles of the replicates' ``values``, NaN ones skipped with a
    warning (:func:`patient_bootstrap_ci`)."""
    n_boot = len(values)
    valid = values[~np.isnan(values)]
    if len(valid) == 0:
        raise ValueError("the metric is undefined (NaN) on every bootstrap replicate")
    if len(valid) < n_boot:
        warnings.warn(
            f"skipped {n_boot - len(valid)} of {n_boot} bootstrap replicates where the metric is undefined",
            stacklevel=2,
        )
    low, high = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def replicate_metrics(predictions: pd.DataFrame, metrics: Sequence[str], counts: np.ndarray, codes: np.ndarray) -> dict[str, np.ndarray]:
    """Every bootstrap replicate's metrics at once: replicate b holds each row of patient i
    ``counts[b, i]`` times (``codes`` maps rows to patients), which is what concatenating the
    drawn patients' rows gives, so the values equal :data:`METRIC_FNS` on the replicates.

    Confusion counts are one matrix product; AUROC is the weighted Mann-Whitney statistic
    (ties count one half, as ``roc_auc_score``), NaN where a replicate has one class only.
    """
    label = predictions["label"].to_numpy().astype(bool)
    weights = counts[:, codes].astype(float)  # (n_boot, n_rows): how often each row is drawn
    out: dict[str, np.ndarray] = {}
    if set(metrics) - {"auroc"}:
        pred = predictions["pred"].to_numpy().astype(bool)
        tp, fp = weights @ (label & pred), weights @ (~label & pred)
        fn, tn = weights @ (label & ~pred), weights @ (~label & ~pred)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = {
                "accuracy": (tp + tn) / (tp + tn + fp + fn),
                "precision": np.where(tp + fp > 0, tp / (tp + fp), 0.0),
                "recall": np.where(tp + fn > 0, tp / (tp + fn), 0.0),
                "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
            }
        out.update({name: ratios[name] for name in metrics if name in ratios})
    if "auroc" in metrics:
        scores, tie_group = np.unique(predictions["prob"].to_numpy(), return_inverse=True)
        groups = np.zeros((len(tie_group), len(scores)))
        groups[np.arange(len(tie_group)), tie_group] = 1.0
        positives, negatives = (weights * label) @ groups, (weights * ~label) @ groups  # per score, ascending
        below = np.cumsum(negatives, axis=1) - negatives
        with np.errstate(divide="ignore", invalid="ignore"):
            auc = (positives * (below + 0.5 * negatives)).sum(axis=1) / (positives.sum(axis=1) * negatives.sum(axis=1))
        out["auroc"] = np.where((positives.sum(axis=1) > 0) & (negatives.sum(axis=1) > 0), auc, np.nan)
    return out


def patient_resample_counts(patient_ids: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_boot, patients) how often each patient is drawn in each replicate (patients drawn with
    replacement, as many as there are), and each row's patient index into those columns."""
    patients, codes = np.unique(patient_ids, return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(patients), (n_boot, len(patients)))
    counts = np.zeros((n_boot, len(patients)), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n_boot), len(patients)), draws.ravel()), 1)
    return counts, codes


def patient_bootstrap_cis(predictions: pd.DataFrame, metrics: Sequence[str], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict[str, tuple[float, float]]:
    """:func:`patient_bootstrap_ci` of several built-in metrics with the same draws, vectorised
    (a CV summary's five metrics x 1000 replicates took ~20 s through sklearn, now well under 1 s)."""
    unknown = set(metrics) - set(METRIC_FNS)
    if unknown:
        raise ValueError(f"no vectorised form for metric(s) {sorted(unknown)}")
    if len(predictions) == 0:
        raise ValueError("no predictions to bootstrap")
    counts, codes = patient_resample_counts(predictions["patient_id"].to_numpy(), n_boot, seed)
    cis = {}
    for name, values in replicate_metrics(predictions, metrics, counts, codes).items():
        valid = values[~np.isnan(values)]
        if len(valid) == 0:
            raise ValueError(f"{name} is undefined (NaN) on every bootstrap replicate")
        if len(valid) < n_boot:
            warnings.warn(f"{name}: skipped {n_boot - len(valid)} of {n_boot} bootstrap replicates where it is undefined", stacklevel=2)
        low, high = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
        cis[name] = (float(low), float(high))
    return cis


def format_p(p: float) -> str:
    """A p-value for a table: ``p<0.001``; three decimals below 0.01 (``p=0.004``); else two (``p=0.03``).

    Where rounding would print a value at or above a threshold the p-value lies below (0.05 or
    0.01, e.g. 0.0496 -> "0.05"), the bound is printed instead (``p<0.05``), so that the text
    never misstates significance. NaN prints as ``p=n/a``.
    """
    if math.isnan(p):
        return "p=n/a"
    if p < 0.001:
        return "p<0.001"
    text = f"{p:.{3 if p < 0.01 else 2}f}"
    for threshold in (0.01, 0.05):
        if p < threshold <= float(text):
            return f"p<{threshold:g}"
    return f"p={text}"


def significance_marker(p: float) -> str:
    """Stars for a table cell: ``***`` p<0.001, ``**`` p<0.01, ``*`` p<0.05, else an empty string."""
    if math.isnan(p):
        return ""
    for threshold, marker in ((0.001, "***"), (0.01, "**"), (0.05, "*")):
        if p < threshold:
            return marker
    return ""


def multiclass_bootstrap_cis(predictions: pd.DataFrame, label_names: Sequence[str], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict[str, tuple[float, float]]:
    """:func:`patient_bootstrap_cis` of K > 2 classes, the same patient draws: accuracy, balanced
    accuracy, macro F1/precision/recall/AUROC (one-vs-rest) and each class's ``<metric>_<name>``.

    ``predictions`` has ``label`` and ``pred`` (class indices), ``prob_<name>`` per class and
    ``patient_id``. Each class's one-vs-rest scores are :func:`replicate_metrics` of the binary
    task "this class or not"; the macro values are their means over the K classes (as sklearn's
    ``average='macro'``). Balanced accuracy is the mean recall over the classes a replicate holds
    (as sklearn's ``balanced_accuracy_score``), macro AUROC is NaN where a replicate lacks a class.
    """
    if len(predictions) == 0:
        raise ValueError("no predictions to bootstrap")
    counts, codes = patient_resample_counts(predictions["patient_id"].to_numpy(), n_boot, seed)
    label, pred = predictions["label"].to_numpy().astype(int), predictions["pred"].to_numpy().astype(int)
    weights = counts[:, codes].astype(float)
    per_class = []
    for k, name in enumerate(label_names):
        one_vs_rest = pd.DataFrame({"label": (label == k).astype(int), "pred": (pred == k).astype(int), "prob": predictions[f"prob_{name}"].to_numpy()})
        per_class.append(replicate_metrics(one_vs_rest, ["f1", "precision", "recall", "auroc"], counts, codes))
    present = np.stack([weights @ (label == k) > 0 for k in range(len(label_names))])  # (K, n_boot)
    recalls = np.stack([values["recall"] for values in per_class])
    values: dict[str, np.ndarray] = {
        "accuracy": (weights @ (label == pred)) / weights.sum(axis=1),
        "balanced_accuracy": np.where(present, recalls, 0.0).sum(axis=0) / np.maximum(present.sum(axis=0), 1),
        **{metric: np.mean([v[metric] for v in per_class], axis=0) for metric in ("f1", "precision", "recall", "auroc")},
    }
    for name, class_values in zip(label_names, per_class):
        values.update({f"{metric}_{name}": class_values[metric] for metric in ("f1", "precision", "recall", "auroc")})
    cis = {}
    for metric, replicate_values in values.items():
        valid = replicate_values[~np.isnan(replicate_values)]
        if len(valid) == 0:
            cis[metric] = (math.nan, math.nan)
            continue
        if len(valid) < n_boot:
            warnings.warn(f"{metric}: skipped {n_boot - len(valid)} of {n_boot} bootstrap replicates where it is undefined", stacklevel=2)
        low, high = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
        cis[metric] = (float(low), float(high))
    return cis
