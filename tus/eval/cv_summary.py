"""Summaries of a cross-validation run: runs.csv, mean +- std per metric, the non-informative
baselines, summary.json and summary.md.

Besides the sample std over all runs (``metrics``), the summary carries the spread as the
reference paper computes it (``spread``: accuracy std over all runs, the other metrics' std
over per-seed means; :func:`tus.eval.statistics.paper_spread`) and 95% confidence intervals
from a patient-level bootstrap of the test predictions pooled over all runs (``ci``;
:func:`tus.eval.statistics.patient_bootstrap_ci`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from tus.eval.cv_metrics import METRIC_NAMES, MULTICLASS_METRIC_NAMES, PER_CLASS_METRICS, PROBABILITY_PREFIX, is_multiclass, metric_names
from tus.eval.statistics import METRIC_FNS, multiclass_bootstrap_cis, paper_spread, patient_bootstrap_cis

CI_BOOTSTRAPS = 1000
CI_ALPHA = 0.05
NO_RESULT = {"mean": None, "std": None}  # a metric over no finished run (every run failed)
# A run stopped by a non-finite loss leaves this (step, reason) instead of metrics.json.
FAILED_FILE = "failed.json"
# Test probabilities spread less than this: the model gives every image the same answer.
CONSTANT_PROBABILITY_SPREAD = 1e-4


def collapse_reason(predictions: pd.DataFrame, metrics_csv: Path, val_metric: str | None = None) -> str | None:
    """Why a fine-tuned model looks collapsed (None if it does not): its test probabilities are
    (nearly) constant, or its inner validation AUROC was 0.5 at every validation."""
    if "probability" in predictions.columns:
        probabilities = predictions["probability"].astype(float)
        if len(probabilities) and float(probabilities.max() - probabilities.min()) < CONSTANT_PROBABILITY_SPREAD:
            return f"every test image gets probability {probabilities.iloc[0]:.3f} (constant predictions)"
    else:  # K > 2 classes: every class's probability (nearly) the same for every image
        columns = [c for c in predictions.columns if c.startswith(PROBABILITY_PREFIX)]
        table = predictions[columns].astype(float)
        if len(table) and columns and float((table.max() - table.min()).max()) < CONSTANT_PROBABILITY_SPREAD:
            shown = ", ".join(f"{c[len(PROBABILITY_PREFIX) :]} {table[c].iloc[0]:.3f}" for c in columns)
            return f"every test image gets the class probabilities {shown} (constant predictions)"
    if val_metric is not None and Path(metrics_csv).is_file():
        log = pd.read_csv(metrics_csv)
        if "val/auroc" in log.columns:
            values = log["val/auroc"].dropna().astype(float)
            if len(values) and bool(((values - 0.5).abs() < 1e-9).all()):
                return f"validation AUROC stayed at 0.5 at all {len(values)} validations"
    return None


def failed_runs(run_dir: Path) -> list[dict]:
    """Runs that stopped with an error (``failed.json``) and have no result."""
    return [{"run": p.parent.name, **json.loads(p.read_text())} for p in sorted((Path(run_dir) / "runs").glob(f"*/{FAILED_FILE}")) if not (p.parent / "metrics.json").exists()]


# Written by tus.stages.cv_decision when a run asks for a threshold rule or calibration.
DECISION_FILE = "decision.json"


def collect_runs(run_dir: Path) -> pd.DataFrame:
    records = [json.loads(p.read_text()) for p in sorted((Path(run_dir) / "runs").glob("*/metrics.json"))]
    runs = pd.DataFrame(records).sort_values(["seed", "fold"]).reset_index(drop=True) if records else pd.DataFrame()
    runs.to_csv(Path(run_dir) / "runs.csv", index=False)
    return runs


def aggregate(runs: pd.DataFrame, metrics=METRIC_NAMES) -> dict:
    """Mean and sample standard deviation (ddof=1) of each metric over fold x seed runs."""
    summary = {}
    for name in metrics:
        values = runs[name].astype(float).to_numpy()
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary[name] = {"mean": float(values.mean()), "std": std, "n": int(len(values))}
    return summary


def trivial_baselines(positive_rate: float) -> dict:
    """Scores of classifiers that ignore the image, for this class balance.

    - always negative: accuracy 1-p, F1 0;
    - prior-matching random guesser (predicts positive with probability p): accuracy
      p^2 + (1-p)^2, precision = recall = F1 = p, AUROC 0.5.
    """
    p = float(positive_rate)
    return {
        "positive_rate": p,
        "always_negative": {"accuracy": 1 - p, "f1": 0.0, "precision": 0.0, "recall": 0.0, "auroc": 0.5},
        "prior_random": {"accuracy": p * p + (1 - p) ** 2, "f1": p, "precision": p, "recall": p, "auroc": 0.5},
    }


def multiclass_baselines(class_rates: list[float], label_names: list[str]) -> dict:
    """Scores of classifiers that ignore the image, for K > 2 classes with these image shares p_k
    (macro = the unweighted mean over classes; AUROC of a constant or random score is 0.5).

    - always the majority class m: accuracy p_m, balanced accuracy 1/K; class m's precision p_m,
      recall 1, F1 2p_m/(1+p_m), every other class's 0;
    - prior-matching random guesser (predicts class k with probability p_k): accuracy sum p_k^2;
      class k's precision = recall = F1 = p_k, so balanced accuracy and the macro ones are 1/K.
    """
    rates = [float(p) for p in class_rates]
    k = len(rates)
    m = max(range(k), key=lambda i: rates[i])
    f1_m = 2 * rates[m] / (1 + rates[m])
    majority = {"accuracy": rates[m], "balanced_accuracy": 1 / k, "f1": f1_m / k, "precision": rates[m] / k, "recall": 1 / k, "auroc": 0.5}
    for i, name in enumerate(label_names):
        majority.update({f"f1_{name}": f1_m if i == m else 0.0, f"precision_{name}": rates[m] if i == m else 0.0, f"recall_{name}": 1.0 if i == m else 0.0, f"auroc_{name}": 0.5})
    random = {"accuracy": sum(p * p for p in rates), "balanced_accuracy": 1 / k, "f1": 1 / k, "precision": 1 / k, "recall": 1 / k, "auroc": 0.5}
    for i, name in enumerate(label_names):
        random.update({f"f1_{name}": rates[i], f"precision_{name}": rates[i], f"recall_{name}": rates[i], f"auroc_{name}": 0.5})
    return {"class_rates": dict(zip(label_names, rates)), "majority_class": label_names[m], "always_majority": majority, "prior_random": random}


def format_mean_std(stats: dict, scale: float = 100.0, digits: int = 1) -> str:
    if stats["mean"] is None or math.isnan(stats["mean"]):
        return "n/a"
    std = stats["std"]
    spread = "n/a" if std is None or math.isnan(std) else f"{std * scale:.{digits}f}"
    return f"{stats['mean'] * scale:.{digits}f} ± {spread}"


def pooled_predictions(run_dir: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """Every finished run's test predictions (``runs/*/predictions.csv``) with fold, seed and patient.

    Columns as :mod:`tus.eval.statistics` expects them: ``sample_id``, ``patient_id``, ``label``,
    ``prob``, ``pred``, ``fold``, ``seed``. Runs without predictions are left out.
    """
    patients = frame.drop_duplicates("sample_id").set_index("sample_id")["patient_id"].astype(str)
    tables = []
    class_columns: list[str] = []
    for metrics_path in sorted((Path(run_dir) / "runs").glob("*/metrics.json")):
        path = metrics_path.parent / "predictions.csv"
        if not path.is_file():
            continue
        record = json.loads(metrics_path.read_text())
        table = pd.read_csv(path, dtype={"sample_id": str}).rename(columns={"probability": "prob", "prediction": "pred"})
        tables.append(table.assign(fold=record.get("fold"), seed=record.get("seed"), patient_id=table["sample_id"].map(patients)))
        class_columns = [c for c in table.columns if c.startswith(PROBABILITY_PREFIX)]
    # K > 2 classes: one probability column per class instead of the positive class's ``prob``.
    columns = ["sample_id", "patient_id", "label", "pred", *class_columns, "fold", "seed"] if class_columns else ["sample_id", "patient_id", "label", "prob", "pred", "fold", "seed"]
    return pd.concat(tables, ignore_index=True)[columns] if tables else pd.DataFrame(columns=columns)


def bootstrap_cis(predictions: pd.DataFrame, metrics=METRIC_NAMES, n_boot: int = CI_BOOTSTRAPS, alpha: float = CI_ALPHA, seed: int = 0) -> dict:
    """Percentile CI of each metric over the pooled predictions, resampling patients (clusters)."""
    return {name: {"low": low, "high": high} for name, (low, high) in patient_bootstrap_cis(predictions, list(metrics), n_boot=n_boot, alpha=alpha, seed=seed).items()}


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined std (one seed) is written as null."""
    return None if value is None or math.isnan(value) else float(value)


def write_summary(run_dir: Path, runs: pd.DataFrame, frame: pd.DataFrame, config: Any, n_boot: int = CI_BOOTSTRAPS) -> dict:
    expected = len(config.seeds) * config.data.num_folds
    label_names = getattr(config.data, "label_names", None)
    multiclass = is_multiclass(label_names)
    names = metric_names(label_names)
    stats = aggregate(runs, names) if len(runs) else {}
    if multiclass:
        baselines = multiclass_baselines([float((frame["label"] == k).mean()) for k in range(len(label_names))], list(label_names))
    else:
        baselines = trivial_baselines(float((frame["label"] == 1).mean()))
    spread = paper_spread(runs, names) if len(runs) else {}
    spread = {name: {k: _finite_or_none(v) if k in ("mean", "std", "sample_std") else v for k, v in values.items()} for name, values in spread.items()}
    predictions = pooled_predictions(run_dir, frame)
    if multiclass and len(predictions):
        cis = {name: {"low": _finite_or_none(low), "high": _finite_or_none(high)} for name, (low, high) in multiclass_bootstrap_cis(predictions, label_names, n_boot=n_boot, alpha=CI_ALPHA).items()}
    else:
        cis = bootstrap_cis(predictions, n_boot=n_boot) if len(predictions) else {}
    summary = {
        "name": config.name,
        "runs": int(len(runs)),
        "expected_runs": expected,
        "folds": config.data.num_folds,
        "seeds": list(config.seeds),
        "selection": config.selection,
        "selection_note": SELECTION_TEXT[config.selection],
        "metrics": stats,
        "spread": spread,
        "spread_note": SPREAD_TEXT,
        "ci": cis,
        "ci_note": CI_TEXT.format(confidence=1 - CI_ALPHA, n_boot=n_boot, runs=predictions[["fold", "seed"]].drop_duplicates().shape[0], patients=predictions["patient_id"].nunique()),
        "baselines": baselines,
        "failed": [{"run": f["run"], "step": f.get("step"), "reason": f.get("reason")} for f in failed_runs(run_dir)],
        "collapsed": _collapsed(runs),
        "selected": _selected(runs),
    }
    if multiclass:
        summary["label_names"] = list(label_names)
    if (run_dir / DECISION_FILE).is_file() and len(predictions):
        summary["decision"] = decision_metrics(predictions, json.loads((run_dir / DECISION_FILE).read_text()), n_boot=n_boot)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "summary.md").write_text(render_summary_markdown(summary))
    return summary


def _run_name(row: Any) -> str:
    return f"fold{int(row['fold'])}-seed{int(row['seed'])}"


def _collapsed(runs: pd.DataFrame) -> list[dict]:
    if "collapsed" not in runs.columns:
        return []
    return [{"run": _run_name(row), "reason": row.get("collapse_reason")} for _, row in runs.iterrows() if not pd.isna(row["collapsed"]) and bool(row["collapsed"])]


def _selected(runs: pd.DataFrame) -> list[dict]:
    """Per run, the epoch and step of the model that was tested (out of the steps trained)."""
    if "selected_step" not in runs.columns:
        return []
    return [
        {"run": _run_name(row), "epoch": int(row["selected_epoch"]), "step": int(row["selected_step"]), "of_steps": int(row["steps"])}
        for _, row in runs.iterrows()
        if not pd.isna(row.get("selected_step"))
    ]


def render_summary_markdown(summary: dict) -> str:
    if is_multiclass(summary.get("label_names")):
        return render_multiclass_markdown(summary)
    header = "| | " + " | ".join(n.capitalize() if n != "auroc" else "AUROC" for n in METRIC_NAMES) + " |"
    rule = "|---" * (len(METRIC_NAMES) + 1) + "|"
    model = "| " + summary["name"] + " | " + " | ".join(format_mean_std(summary["metrics"].get(n, NO_RESULT)) for n in METRIC_NAMES) + " |"
    rows = [header, rule, model]
    spread = summary.get("spread") or {}
    if spread:
        rows.append("| *paper spread* | " + " | ".join(format_mean_std(spread[n]) for n in METRIC_NAMES) + " |")
    cis = summary.get("ci") or {}
    if cis:
        rows.append("| *95% CI, patients* | " + " | ".join(_format_ci(cis.get(n)) for n in METRIC_NAMES) + " |")
    for key, label in (("always_negative", "always negative"), ("prior_random", "random (prior-matched)")):
        base = summary["baselines"][key]
        rows.append(f"| *{label}* | " + " | ".join(f"{base[n] * 100:.1f}" for n in METRIC_NAMES) + " |")
    decision = summary.get("decision")
    if decision:
        rows.append(f"| *at threshold ({decision['rule']})* | " + " | ".join(format_mean_std(decision["metrics"][n]) for n in METRIC_NAMES) + " |")
        rows.append("| *its 95% CI, patients* | " + " | ".join(_format_ci(decision["ci"].get(n)) for n in METRIC_NAMES) + " |")
    p = summary["baselines"]["positive_rate"]
    return "\n".join(
        [
            f"# {summary['name']}: {summary['folds']}-fold patient-grouped CV x {len(summary['seeds'])} seeds",
            "",
            *rows,
            "",
            f"Mean ± sample std (%) over {summary['runs']} of {summary['expected_runs']} runs; positive = class 1 ({p:.1%} of images).",
            *([f"*paper spread*: {summary['spread_note']}."] if spread else []),
            *([f"*95% CI, patients*: {summary['ci_note']}."] if cis else []),
            f"Model selection: {summary['selection_note']}.",
            *_selected_lines(summary),
            *_warning_lines(summary),
            *([decision_text(decision)] if decision else []),
            "",
        ]
    )


MULTICLASS_HEADERS = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced accuracy", "f1": "Macro F1", "precision": "Macro precision", "recall": "Macro recall", "auroc": "Macro AUROC"}


def render_multiclass_markdown(summary: dict) -> str:
    """The K > 2 table: the macro row (and its spread, CI and baselines), then one row per class
    under it with that class's one-vs-rest F1, precision, recall and AUROC in the macro columns."""
    names = MULTICLASS_METRIC_NAMES
    label_names = summary["label_names"]
    metrics, cis = summary["metrics"], summary.get("ci") or {}
    rows = ["| | " + " | ".join(MULTICLASS_HEADERS[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    rows.append("| " + summary["name"] + " (macro) | " + " | ".join(format_mean_std(metrics.get(n, NO_RESULT)) for n in names) + " |")
    spread = summary.get("spread") or {}
    if spread:
        rows.append("| *paper spread* | " + " | ".join(format_mean_std(spread[n]) for n in names) + " |")
    if cis:
        rows.append("| *95% CI, patients* | " + " | ".join(_format_ci(cis.get(n)) for n in names) + " |")
    for label in label_names:
        cells = [format_mean_std(metrics.get(f"{n}_{label}", NO_RESULT)) if n in PER_CLASS_METRICS else "" for n in names]
        rows.append(f"| class {label} | " + " | ".join(cells) + " |")
        if cis:
            rows.append("| *its 95% CI* | " + " | ".join(_format_ci(cis.get(f"{n}_{label}")) if n in PER_CLASS_METRICS else "" for n in names) + " |")
    baselines = summary["baselines"]
    for key, label in (("always_majority", f"always {baselines['majority_class']} (majority)"), ("prior_random", "random (prior-matched)")):
        rows.append(f"| *{label}* | " + " | ".join(f"{baselines[key][n] * 100:.1f}" for n in names) + " |")
    shares = ", ".join(f"{name} {rate:.1%}" for name, rate in baselines["class_rates"].items())
    return "\n".join(
        [
            f"# {summary['name']}: {summary['folds']}-fold patient-grouped CV x {len(summary['seeds'])} seeds, {len(label_names)} classes",
            "",
            *rows,
            "",
            f"Mean ± sample std (%) over {summary['runs']} of {summary['expected_runs']} runs; classes (share of images): {shares}. "
            "Prediction = the most probable class; macro = unweighted mean over the classes; a class's row is that class against the rest "
            "(its F1, precision, recall and AUROC in the macro columns).",
            *([f"*paper spread*: {summary['spread_note']}."] if spread else []),
            *([f"*95% CI, patients*: {summary['ci_note']}."] if cis else []),
            f"Model selection: {summary['selection_note']}.",
            *_selected_lines(summary),
            *_warning_lines(summary),
            "",
        ]
    )


def _selected_lines(summary: dict) -> list[str]:
    selected = summary.get("selected") or []
    if summary.get("selection") != "inner_val" or not selected:
        return []
    return ["Selected models (epoch, step of steps trained): " + "; ".join(f"{s['run']} ({s['epoch']}, {s['step']} of {s['of_steps']})" for s in selected) + "."]


def _warning_lines(summary: dict) -> list[str]:
    """Runs that failed or collapsed, said where a reader of the table sees them."""
    lines = []
    for failed in summary.get("failed") or []:
        lines.append(f"**WARNING: {failed['run']} FAILED** (not in the table): {failed['reason']}")
    collapsed = summary.get("collapsed") or []
    if collapsed:
        lines.append(
            f"**WARNING: {len(collapsed)} of {summary['runs']} runs COLLAPSED** (their numbers are in the table, but these models did not learn): "
            + "; ".join(f"{c['run']}: {c['reason']}" for c in collapsed)
        )
    return [""] + lines if lines else []


def decision_metrics(predictions: pd.DataFrame, decision: dict, n_boot: int = CI_BOOTSTRAPS) -> dict:
    """The test metrics at each run's own chosen threshold (and temperature), beside the 0.5 ones above.

    Each fold x seed run's test predictions are calibrated with its temperature and thresholded at its threshold
    (both fitted without its test fold, see :mod:`tus.stages.cv_decision`); mean +- std over runs, patient
    bootstrap CIs of the pooled predictions, and the expected calibration error of the pooled test predictions
    before and after calibration.
    """
    from tus.eval.calibration import apply_temperature, expected_calibration_error

    chosen = {(r["fold"], r["seed"]): r for r in decision["per_run"]}
    parts, records = [], []
    for (fold, seed), run in predictions.groupby(["fold", "seed"]):
        settings = chosen.get((int(fold), int(seed)), {"threshold": 0.5, "temperature": 1.0})
        calibrated = apply_temperature(run["prob"].to_numpy(), settings["temperature"])
        part = run.assign(prob=calibrated, pred=(calibrated >= settings["threshold"]).astype(int))
        parts.append(part)
        records.append({name: METRIC_FNS[name](part) for name in METRIC_NAMES})
    pooled = pd.concat(parts, ignore_index=True)
    labels = predictions["label"].to_numpy()
    return {
        "rule": decision["rule"],
        "calibration": decision["calibration"],
        "thresholds": {f"fold{r['fold']}-seed{r['seed']}": r["threshold"] for r in decision["per_run"]},
        "metrics": aggregate(pd.DataFrame(records)),
        "ci": bootstrap_cis(pooled, n_boot=n_boot),
        "ece": {"before": expected_calibration_error(predictions["prob"].to_numpy(), labels), "after": expected_calibration_error(pooled["prob"].to_numpy(), pooled["label"].to_numpy())},
    }


def decision_text(decision: dict) -> str:
    thresholds = list(decision["thresholds"].values())
    text = (
        f"*at threshold ({decision['rule']})*: each run's test fold thresholded at the value chosen on its training folds' out-of-fold predictions "
        f"({min(thresholds):.3g}-{max(thresholds):.3g} over runs)"
    )
    if decision["calibration"] != "none":
        text += f"; {decision['calibration']} calibration fitted the same way, ECE of the pooled test predictions {decision['ece']['before']:.3f} before, {decision['ece']['after']:.3f} after"
    return text + "."


def _format_ci(ci: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    if not ci or ci["low"] is None or math.isnan(ci["low"]):
        return "n/a"
    return f"[{ci['low'] * scale:.{digits}f}, {ci['high'] * scale:.{digits}f}]"


SPREAD_TEXT = "mean ± std (%) as the paper reports them: accuracy's std over all fold x seed runs, the other metrics' std over the per-seed means (sample std, ddof=1; n/a with one seed)"
CI_TEXT = "{confidence:.0%} percentile bootstrap ({n_boot} resamples of patients, all of a patient's images and runs together) of the test predictions pooled over {runs} runs ({patients} patients)"

SELECTION_TEXT = {
    "last": "the last epoch of each run is evaluated on its held-out test fold (no model selection)",
    "inner_val": "each run's best epoch on an inner, patient-grouped validation split of its training folds is evaluated on the held-out test fold",
}
