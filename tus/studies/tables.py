"""A study's table: collect each arm's CV summary (and marker numbers), render it like the paper's.

Below it, every arm is compared with the study's baseline arm (a ``baseline`` key of the study
config when it has one, else the first arm) on the same folds x seeds: the mean paired
difference, the Nadeau-Bengio corrected resampled t-test p-value and a bootstrap CI of the
difference (:func:`tus.eval.statistics.compare_arms`), with significance stars.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tus.eval.statistics import compare_arms, format_p, significance_marker
from tus.figures.runs import write_study_figures
from tus.runs import read_json
from tus.studies.schema import CV_METRICS, MARKER_METRICS, PRETRAIN_ROOT, Study

COMPARISON_BOOTSTRAPS = 1000


@dataclass
class ArmResult:
    name: str
    cells: list[str]
    metrics: dict[str, dict]  # name -> {mean, std, n}
    runs: int
    expected_runs: int
    # metric -> compare_arms' result against the baseline arm, or {"error": why not}
    comparisons: dict[str, dict] = field(default_factory=dict)


def collect_results(study: Study, study_dir: Path) -> list[ArmResult]:
    """Each arm's row cells and metrics from its run dirs (arms not run yet have no metrics)."""
    results = []
    for name, arm in study.config.arms.items():
        arm_dir = study_dir / name
        metrics: dict[str, dict] = {}
        runs = expected = 0
        finetune = read_json(arm_dir / "finetune" / "summary.json")
        if finetune is not None:
            metrics.update(finetune["metrics"])
            runs, expected = finetune["runs"], finetune["expected_runs"]
        markers = read_json(arm_dir / "markers" / "summary.json")
        if markers is not None:
            metrics.update(markers["metrics"])
        fields = {"pretrain_images": _pretrain_images(arm_dir)}
        cells = [str(arm.row[column]).format_map(fields) for column in study.config.table.columns]
        results.append(ArmResult(name, cells, metrics, runs, expected))
    add_comparisons(study, study_dir, results)
    return results


def baseline_arm(study: Study) -> str:
    """The arm every other is compared with: the config's ``baseline`` if set, else the first arm."""
    named = getattr(study.config, "baseline", None)
    return named if named else next(iter(study.config.arms))


def split_sizes(folds: pd.DataFrame) -> tuple[float, float]:
    """(n_train, n_test) of one run from ``folds.csv``, averaged over its splits (grouped folds differ in size).

    A ``seed`` column (folds re-drawn per seed) makes each seed's folds a set of splits of its own.
    """
    by_seed = folds.groupby("seed") if "seed" in folds.columns else [(None, folds)]
    splits = [(len(table) - size, size) for _, table in by_seed for size in table["fold"].value_counts()]
    return float(np.mean([s[0] for s in splits])), float(np.mean([s[1] for s in splits]))


def add_comparisons(study: Study, study_dir: Path, results: list[ArmResult], n_boot: int = COMPARISON_BOOTSTRAPS) -> None:
    """Fill each arm's ``comparisons`` with the paired comparison against the baseline arm."""
    baseline = baseline_arm(study)
    base_dir = study_dir / baseline / "finetune"
    if not (base_dir / "runs.csv").is_file() or not (base_dir / "folds.csv").is_file():
        return
    base_runs = pd.read_csv(base_dir / "runs.csv")
    n_train, n_test = split_sizes(pd.read_csv(base_dir / "folds.csv"))
    metrics = [m for m in study.config.table.metrics if m in CV_METRICS]
    for result in results:
        runs_path = study_dir / result.name / "finetune" / "runs.csv"
        if result.name == baseline or not runs_path.is_file():
            continue
        arm_runs = pd.read_csv(runs_path)
        for metric in metrics:
            try:
                result.comparisons[metric] = compare_arms(base_runs, arm_runs, metric, n_train, n_test, n_boot=n_boot)
            except ValueError as error:  # unpaired or unfinished runs: say so instead of a number
                result.comparisons[metric] = {"error": str(error)}


def _pretrain_images(arm_dir: Path) -> str:
    record = read_json(arm_dir / "arm.json")
    # Found beside the study dir (<out>/_pretrain/<key>), so a moved --out still renders.
    run = arm_dir.parent.parent / PRETRAIN_ROOT / Path(record["pretrain_run"]).name if record and record["pretrain_run"] else None
    pool = read_json(run / "pool.json") if run else None
    return format_count(sum(pool["images_per_organ"].values())) if pool else "—"


def format_count(count: int) -> str:
    """1664 -> 1.66K, 1281167 -> 1.28M (the paper's '# Samples' style)."""
    if count >= 1_000_000:
        return f"{count / 1e6:.2f}M"
    if count >= 1_000:
        return f"{count / 1e3:.2f}K"
    return str(count)


def table_frame(study: Study, results: list[ArmResult]) -> pd.DataFrame:
    """One row per arm: its cells, then mean and std (in %) of each metric, and run counts."""
    rows = []
    for result in results:
        row = {"arm": result.name, **dict(zip(study.config.table.columns, result.cells))}
        for metric in study.config.table.metrics:
            stats = result.metrics.get(metric)
            row[f"{metric}_mean"] = 100 * stats["mean"] if stats else np.nan
            row[f"{metric}_std"] = 100 * stats["std"] if stats else np.nan
        for metric, comparison in result.comparisons.items():
            if "error" not in comparison:
                row[f"{metric}_diff"] = 100 * comparison["mean_diff"]
                row[f"{metric}_diff_ci_low"] = 100 * comparison["ci_low"]
                row[f"{metric}_diff_ci_high"] = 100 * comparison["ci_high"]
                row[f"{metric}_p"] = comparison["p"]
        rows.append({**row, "runs": result.runs, "expected_runs": result.expected_runs})
    return pd.DataFrame(rows)


def render_markdown(study: Study, results: list[ArmResult]) -> str:
    """The table as in the paper: mean ± std in %, the best mean of each column in bold."""
    table = study.config.table
    metrics = {**CV_METRICS, **MARKER_METRICS}
    digits = table.digits
    header = [*table.columns, *(metrics[m].header for m in table.metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + ":--|" * len(table.columns) + "--:|" * len(table.metrics)]
    best = {m: _best(results, m, metrics[m].better, digits) for m in table.metrics}
    for result in results:
        cells = [c.replace("|", "\\|") for c in result.cells]
        for metric in table.metrics:
            stats = result.metrics.get(metric)
            if stats is None or np.isnan(stats["mean"]):
                cells.append("—")
                continue
            text = f"{100 * stats['mean']:.{digits}f} ± {100 * stats['std']:.{digits}f}"
            cells.append(f"**{text}**" if round(100 * stats["mean"], digits) == best[metric] else text)
        lines.append("| " + " | ".join(cells) + " |")
    title = f"**{study.config.title}**" if study.config.title else f"**{study.name}**"
    return "\n".join([title, "", *lines, "", _footnote(results), "", *render_comparisons(study, results)])


def render_comparisons(study: Study, results: list[ArmResult]) -> list[str]:
    """Lines of the comparison table (none when no arm could be compared with the baseline)."""
    compared = [r for r in results if r.comparisons]
    if not compared:
        return []
    metrics = [m for m in study.config.table.metrics if m in CV_METRICS]
    digits = study.config.table.digits
    lines = [
        f"**Compared with `{baseline_arm(study)}`** (same folds x seeds)",
        "",
        "| Arm | " + " | ".join(f"Δ {CV_METRICS[m].header}" for m in metrics) + " |",
        "|:--|" + "--:|" * len(metrics),
    ]
    for result in compared:
        cells = []
        for metric in metrics:
            comparison = result.comparisons.get(metric)
            if comparison is None or "error" in comparison:
                cells.append("—")
                continue
            stars = significance_marker(comparison["p"])
            cells.append(f"{100 * comparison['mean_diff']:+.{digits}f}{stars} [{100 * comparison['ci_low']:+.{digits}f}, {100 * comparison['ci_high']:+.{digits}f}], {format_p(comparison['p'])}")
        lines.append(f"| {result.name} | " + " | ".join(cells) + " |")
    errors = sorted({c["error"] for r in compared for c in r.comparisons.values() if "error" in c})
    return [
        *lines,
        "",
        "Mean paired difference arm − baseline (percentage points) over the runs of each fold x seed; "
        "95% percentile bootstrap CI over the paired runs (descriptive: it treats runs as independent); "
        "p: Nadeau-Bengio corrected resampled t-test (two-sided). * p<0.05, ** p<0.01, *** p<0.001.",
        *([""] + [f"Not compared: {e}." for e in errors] if errors else []),
        "",
    ]


def _best(results: list[ArmResult], metric: str, better: str | None, digits: int) -> float | None:
    means = [round(100 * r.metrics[metric]["mean"], digits) for r in results if metric in r.metrics and not np.isnan(r.metrics[metric]["mean"])]
    if better is None or len(means) < 2:
        return None
    return max(means) if better == "higher" else min(means)


def _footnote(results: list[ArmResult]) -> str:
    runs = sorted({r.expected_runs for r in results if r.runs})
    notes = [f"Mean ± sample std (%) over the folds x seeds of each arm ({'/'.join(map(str, runs)) or 'no'} runs); best mean per column in bold."]
    unfinished = [f"{r.name} ({f'{r.runs}/{r.expected_runs} runs' if r.runs else 'not run'})" for r in results if not r.runs or r.runs != r.expected_runs]
    if unfinished:
        notes.append("Not finished: " + ", ".join(unfinished) + ".")
    return " ".join(notes)


def write_table(study: Study, study_dir: Path) -> str:
    results = collect_results(study, study_dir)
    markdown = render_markdown(study, results)
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "table.md").write_text(markdown)
    frame = table_frame(study, results)
    frame.to_csv(study_dir / "table.csv", index=False)
    write_study_figures(study_dir, frame, baseline_arm(study), [m for m in study.config.table.metrics if m in CV_METRICS])
    return markdown
