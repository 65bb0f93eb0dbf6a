"""A study's table: collect each arm's CV summary (and marker numbers), render it like the paper's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tus.runs import read_json
from tus.studies.schema import CV_METRICS, MARKER_METRICS, PRETRAIN_ROOT, Study


@dataclass
class ArmResult:
    name: str
    cells: list[str]
    metrics: dict[str, dict]  # name -> {mean, std, n}
    runs: int
    expected_runs: int


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
    return results


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
    return "\n".join([title, "", *lines, "", _footnote(results), ""])


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
    table_frame(study, results).to_csv(study_dir / "table.csv", index=False)
    return markdown
