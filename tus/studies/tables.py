"""A study's table: collect each arm's CV summary (and marker numbers), render it like the paper's.

Below it, every arm is compared with the study's baseline arm (a ``baseline`` key of the study
config when it has one, else the first arm), only where each fold x seed run of the two arms
tested the same images (their ``folds.csv``; otherwise the table says why not). The statistics
follow the design (:func:`compare_pair`): with folds re-drawn per seed (several splits, the
study default) the mean paired difference over runs, the Nadeau-Bengio corrected resampled
t-test and its interval; with one split shared by every seed, the difference of the metric on
the pooled test predictions with a patient bootstrap (percentile interval and p-value).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tus.data.folds import distinct_splits
from tus.eval.cv_summary import pooled_predictions
from tus.eval.statistics import compare_arms, compare_pooled_predictions, format_p, significance_marker
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


@dataclass
class ArmRuns:
    """What a comparison reads of one arm's CV: ``runs.csv``, ``folds.csv`` and, for the
    one-split design, the pooled test predictions (read when first needed)."""

    name: str
    runs: pd.DataFrame
    folds: pd.DataFrame
    run_dir: Path | None = None
    _predictions: pd.DataFrame | None = None

    @classmethod
    def read(cls, name: str, run_dir: Path) -> ArmRuns | None:
        if not (run_dir / "runs.csv").is_file() or not (run_dir / "folds.csv").is_file():
            return None
        return cls(name, pd.read_csv(run_dir / "runs.csv"), pd.read_csv(run_dir / "folds.csv", dtype={"sample_id": str, "patient_id": str}), run_dir)

    @property
    def predictions(self) -> pd.DataFrame:
        if self._predictions is None:
            assert self.run_dir is not None
            self._predictions = pooled_predictions(self.run_dir, self.folds.drop_duplicates("sample_id"))
        return self._predictions


DESIGNS = {
    "per_seed": "folds re-drawn per seed ({splits} splits)",
    "one_split": "one split shared by every seed",
}


def design_of(folds: pd.DataFrame) -> str:
    """``per_seed`` when ``folds.csv`` holds several splits (folds re-drawn per seed), else ``one_split``."""
    return "per_seed" if distinct_splits(folds) > 1 else "one_split"


def compare_pair(baseline: ArmRuns, arm: ArmRuns, metric: str, n_boot: int = COMPARISON_BOOTSTRAPS) -> dict:
    """The comparison of ``arm`` with ``baseline`` that fits their design; refuses (ValueError,
    one line naming both arms) runs that do not pair or were tested on different images.

    Several splits: :func:`compare_arms` (corrected resampled t-test over the paired runs, n_train
    and n_test from the baseline's ``folds.csv``). One split: :func:`compare_pooled_predictions`
    (patient bootstrap of the paired difference on the pooled test predictions)."""
    names = (baseline.name, arm.name)
    splits = distinct_splits(baseline.folds)
    design = "per_seed" if splits > 1 else "one_split"
    if design == "per_seed":
        n_train, n_test = split_sizes(baseline.folds)
        result = compare_arms(baseline.runs, arm.runs, metric, n_train, n_test, baseline_folds=baseline.folds, arm_folds=arm.folds, names=names)
    else:
        compare_arms(baseline.runs, arm.runs, metric, 1.0, 1.0, baseline_folds=baseline.folds, arm_folds=arm.folds, names=names)  # pairing checks only
        result = compare_pooled_predictions(baseline.predictions, arm.predictions, metric, n_boot=n_boot, names=names)
    return {**result, "design": design, "splits": splits}


def add_comparisons(study: Study, study_dir: Path, results: list[ArmResult], n_boot: int = COMPARISON_BOOTSTRAPS) -> None:
    """Fill each arm's ``comparisons`` with its comparison against the baseline arm (:func:`compare_pair`)."""
    baseline_name = baseline_arm(study)
    baseline = ArmRuns.read(baseline_name, study_dir / baseline_name / "finetune")
    if baseline is None:
        return
    metrics = [m for m in study.config.table.metrics if m in CV_METRICS]
    for result in results:
        arm = ArmRuns.read(result.name, study_dir / result.name / "finetune")
        if result.name == baseline_name or arm is None:
            continue
        for metric in metrics:
            try:
                result.comparisons[metric] = compare_pair(baseline, arm, metric, n_boot=n_boot)
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
                row[f"{metric}_test"] = comparison["test"]
            else:
                row[f"{metric}_not_compared"] = comparison["error"]
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
    return "\n".join([title, "", *lines, "", _footnote(results), *_protocol_notes(study), "", *render_comparisons(study, results)])


def _protocol_notes(study: Study) -> list[str]:
    """What the noisy-label protocols did, under the table of a study that has them."""
    arms = study.config.arms.values()
    notes = []
    if any(getattr(a, "label_protocol", "reference") == "fold_safe" for a in arms):
        notes.append(
            "Fold-safe arms: a test fold keeps its labels, and the training rows of the run tested on fold k were flagged "
            "from the flagging runs whose test fold was k only (never from a run that trained on fold k; "
            "with folds re-drawn per seed, the runs of the same seed's split): flags/fold_safe_flags.csv."
        )
    if any(getattr(a, "labels", "complete") != "complete" and getattr(a, "label_protocol", "reference") == "reference" for a in arms):
        notes.append(
            "Reference arms change the flagged labels in every fold, test folds included, keeping each remaining row's fold: "
            "a filtered arm is tested on fewer images (not paired with the complete arm), a flipped arm on changed labels."
        )
    return ["", *notes] if notes else []


def render_comparisons(study: Study, results: list[ArmResult]) -> list[str]:
    """Lines of the comparison table (none when no arm could be compared with the baseline):
    which pairs are paired, the difference, its interval and p-value, and which test gave them."""
    compared = [r for r in results if r.comparisons]
    if not compared:
        return []
    metrics = [m for m in study.config.table.metrics if m in CV_METRICS]
    digits = study.config.table.digits
    lines = [
        f"**Compared with `{baseline_arm(study)}`**",
        "",
        "| Arm | Paired | " + " | ".join(f"Δ {CV_METRICS[m].header}" for m in metrics) + " |",
        "|:--|:--|" + "--:|" * len(metrics),
    ]
    designs: dict[str, int] = {}
    for result in compared:
        cells = []
        for metric in metrics:
            comparison = result.comparisons.get(metric)
            if comparison is None or "error" in comparison:
                cells.append("—")
                continue
            designs[comparison["design"]] = comparison["splits"]
            stars = significance_marker(comparison["p"])
            cells.append(f"{100 * comparison['mean_diff']:+.{digits}f}{stars} [{100 * comparison['ci_low']:+.{digits}f}, {100 * comparison['ci_high']:+.{digits}f}], {format_p(comparison['p'])}")
        lines.append(f"| {result.name} | {_pairing(result)} | " + " | ".join(cells) + " |")
    errors = sorted({c["error"] for r in compared for c in r.comparisons.values() if "error" in c})
    notes = []
    if "per_seed" in designs:
        notes.append(
            f"{DESIGNS['per_seed'].format(splits=designs['per_seed'])}: mean paired difference arm − baseline (percentage points) over the fold x seed runs; "
            "p: Nadeau-Bengio corrected resampled t-test (two-sided, J − 1 df, variance × (1/J + n_test/n_train)); "
            "interval: 95% corrected-t interval (the differences that test would not reject)."
        )
    if "one_split" in designs:
        notes.append(
            f"{DESIGNS['one_split']}: the runs are not resampled splits, so no t-test over them; difference of the metric on the test predictions pooled over the runs "
            f"(percentage points), 95% percentile interval and p-value from a patient bootstrap of that paired difference ({COMPARISON_BOOTSTRAPS} resamples), "
            "conditional on this split and these trained models (re-draw folds per seed, `folds_per_seed: true`, to cover the split's variation)."
        )
    return [
        *lines,
        "",
        "Paired: each fold x seed run of the arm tested the same images as the baseline's (their folds.csv). " + " ".join(notes) + " * p<0.05, ** p<0.01, *** p<0.001.",
        *([""] + [f"Not compared: {e}." for e in errors] if errors else []),
        "",
    ]


def _pairing(result: ArmResult) -> str:
    done = [c for c in result.comparisons.values() if "error" not in c]
    if not done:
        return "no"
    changes = max(c.get("label_changes", 0) for c in done)
    return f"yes, {done[0]['n_pairs']} runs" + (f" ({changes} test labels differ)" if changes else "")


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
