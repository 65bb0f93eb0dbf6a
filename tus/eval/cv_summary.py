"""Summaries of a cross-validation run: runs.csv, mean +- std per metric, the non-informative
baselines, summary.json and summary.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from tus.methods.classifier import METRIC_NAMES


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


def format_mean_std(stats: dict, scale: float = 100.0, digits: int = 1) -> str:
    if math.isnan(stats["mean"]):
        return "n/a"
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def write_summary(run_dir: Path, runs: pd.DataFrame, frame: pd.DataFrame, config: Any) -> dict:
    expected = len(config.seeds) * config.data.num_folds
    stats = aggregate(runs) if len(runs) else {}
    baselines = trivial_baselines(float((frame["label"] == 1).mean()))
    summary = {
        "name": config.name,
        "runs": int(len(runs)),
        "expected_runs": expected,
        "folds": config.data.num_folds,
        "seeds": list(config.seeds),
        "selection": config.selection,
        "selection_note": SELECTION_TEXT[config.selection],
        "metrics": stats,
        "baselines": baselines,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "summary.md").write_text(render_summary_markdown(summary))
    return summary


def render_summary_markdown(summary: dict) -> str:
    header = "| | " + " | ".join(n.capitalize() if n != "auroc" else "AUROC" for n in METRIC_NAMES) + " |"
    rule = "|---" * (len(METRIC_NAMES) + 1) + "|"
    model = "| " + summary["name"] + " | " + " | ".join(format_mean_std(summary["metrics"][n]) for n in METRIC_NAMES) + " |"
    rows = [header, rule, model]
    for key, label in (("always_negative", "always negative"), ("prior_random", "random (prior-matched)")):
        base = summary["baselines"][key]
        rows.append(f"| *{label}* | " + " | ".join(f"{base[n] * 100:.1f}" for n in METRIC_NAMES) + " |")
    p = summary["baselines"]["positive_rate"]
    return "\n".join([
        f"# {summary['name']}: {summary['folds']}-fold patient-grouped CV x {len(summary['seeds'])} seeds",
        "",
        *rows,
        "",
        f"Mean ± sample std (%) over {summary['runs']} of {summary['expected_runs']} runs; positive = class 1 ({p:.1%} of images).",
        f"Model selection: {summary['selection_note']}.",
        "",
    ])


SELECTION_TEXT = {
    "last": "the last epoch of each run is evaluated on its held-out test fold (no model selection)",
    "inner_val": "each run's best epoch on an inner, patient-grouped validation split of its training folds is evaluated on the held-out test fold",
}
