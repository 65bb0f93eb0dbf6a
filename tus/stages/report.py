"""``tus report``: re-render the figures (and ``summary.md``) of finished runs from their files.

Nothing is trained or evaluated again: every figure is drawn from the CSV/JSON files its run
wrote (predictions, Lightning metrics logs, a study's ``table.csv``, held-out embeddings,
sample grids), so restyling a figure never needs the run again, and the same files give the
same bytes (fixed metadata, fixed bootstrap and UMAP seeds).

A folder that is no run itself (a demo folder, a study's arm) is searched two levels down
for runs.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tus.figures.runs import FIGURES_DIR, run_kind, study_baseline, write_cv_figures, write_diffusion_figures, write_pretrain_figures, write_study_figures

CV_METRICS = ["accuracy", "f1", "precision", "recall", "auroc"]


def find_runs(folder: Path) -> list[tuple[Path, str]]:
    """(run dir, kind) for ``folder`` if it is a run, else for the runs one or two levels below it."""
    kind = run_kind(folder)
    if kind is not None:
        return [(folder, kind)]
    found = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != FIGURES_DIR):
        child_kind = run_kind(child)
        if child_kind is not None:
            found.append((child, child_kind))
            continue
        found += [(grandchild, k) for grandchild in sorted(p for p in child.iterdir() if p.is_dir()) if (k := run_kind(grandchild)) is not None]
    return found


def render_run(run_dir: Path, kind: str, n_boot: int = 1000) -> list[Path]:
    """Re-render one run's figures; returns the files written."""
    if kind == "cv":
        return write_cv_figures(run_dir, n_boot=n_boot)
    if kind == "study":
        table = pd.read_csv(run_dir / "table.csv")
        return write_study_figures(run_dir, table, study_baseline(run_dir, table), CV_METRICS)
    if kind == "pretrain":
        return write_pretrain_figures(run_dir)
    if kind == "diffusion":
        return write_diffusion_figures(run_dir)
    raise ValueError(f"{run_dir}: unknown run kind {kind!r}")


def report(run_dirs: list[str | Path], n_boot: int = 1000) -> dict[Path, list[Path]]:
    """Re-render every run in ``run_dirs`` (each a run, or a folder of runs); ValueError naming a
    folder that does not exist or holds no finished run, before anything is written."""
    plans: list[tuple[Path, str]] = []
    for given in map(Path, run_dirs):
        if not given.is_dir():
            raise FileNotFoundError(f"{given}: no such folder")
        runs = find_runs(given)
        if not runs:
            raise ValueError(f"{given}: not a finished tus run (no folds.csv + runs/, table.csv, pool.json or sample_grids/) and none found below it")
        plans += runs
    return {run_dir: render_run(run_dir, kind, n_boot) for run_dir, kind in plans}
