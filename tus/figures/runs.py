"""Which figures a finished run gets, rendered from the files the run already wrote.

One function per run kind; each reads only CSV/JSON files of the run (never weights), so
``tus report`` re-renders a finished run's figures (byte-identical, see :func:`.style.save`)
and a user can restyle them without training again. Figures go to ``<run>/figures/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tus.figures.style import save

FIGURES_DIR = "figures"
EMBEDDINGS_FILE = "embeddings.csv"
DOWNSTREAM_EMBEDDINGS_FILE = "downstream_embeddings.csv"
# A UMAP of fewer points shows nothing (and the first one in a process costs ~20 s of JIT).
MIN_UMAP_POINTS = 16


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def cv_predictions(run_dir: Path) -> pd.DataFrame:
    """Pooled test predictions of a CV run dir, with patients from its ``folds.csv``."""
    from tus.eval.cv_summary import pooled_predictions

    folds = pd.read_csv(run_dir / "folds.csv", dtype={"sample_id": str, "patient_id": str})
    return pooled_predictions(run_dir, folds)


def write_cv_figures(run_dir: str | Path, n_boot: int = 1000) -> list[Path]:
    """ROC, PR, confusion, calibration and training curves of a finished CV run dir, and
    ``summary.md`` re-rendered from ``summary.json`` with links to them. Returns the figures."""
    from tus.figures import classification as fig

    run_dir = Path(run_dir)
    out = run_dir / FIGURES_DIR
    written: list[Path] = []
    predictions = cv_predictions(run_dir)
    label_names = (_read_json(run_dir / "summary.json") or {}).get("label_names")
    if len(predictions) and label_names:
        # K > 2 classes: a one-vs-rest ROC per class and the K x K confusion; PR and calibration
        # curves are of a positive-class probability and are not drawn.
        for k, name in enumerate(label_names):
            written += save(fig.roc_figure(fig.one_vs_rest(predictions, k, name), n_boot), out, f"roc_{name}")
        written += save(fig.confusion_figure(predictions, label_names), out, "confusion")
    elif len(predictions):
        written += save(fig.roc_figure(predictions, n_boot), out, "roc")
        written += save(fig.pr_figure(predictions, n_boot), out, "pr")
        written += save(fig.confusion_figure(predictions), out, "confusion")
        written += save(fig.calibration_figure(predictions), out, "calibration")
    logs = {path.parent.name: pd.read_csv(path) for path in sorted((run_dir / "runs").glob("*/metrics.csv"))}
    if logs:
        written += save(fig.training_curves_figure(logs), out, "training_curves")
    _link_in_summary(run_dir, [p for p in written if p.suffix == ".png"])
    return written


FIGURE_CAPTIONS = {
    "roc": "ROC curves of every fold × seed run and their mean (AUROC with its patient-bootstrap 95% CI)",
    "pr": "Precision-recall curves (average precision with its patient-bootstrap 95% CI)",
    "confusion": "Confusion matrix summed over the test folds of every run (counts and row %)",
    "calibration": "Reliability diagram of the pooled test predictions, with the expected calibration error",
    "training_curves": "Training (and inner-validation) loss per fold × seed",
    "umap": "UMAP of the pretrained encoder's held-out embeddings, by organ",
    "umap_label": "UMAP of the pretrained encoder's embeddings of the downstream manifest's images, by label",
    "probes": "Representation probes over pretraining steps",
    "samples": "Diffusion samples at the end of training",
}


def _caption(stem: str) -> str:
    if stem.startswith("roc_") and stem not in FIGURE_CAPTIONS:
        return f"ROC curves of class {stem[4:]} against the rest, every fold × seed run and their mean (AUROC with its patient-bootstrap 95% CI)"
    return FIGURE_CAPTIONS.get(stem, stem)


def _link_in_summary(run_dir: Path, pngs: list[Path]) -> None:
    from tus.eval.cv_summary import render_summary_markdown

    summary = _read_json(run_dir / "summary.json")
    if summary is None or not pngs:
        return
    lines = ["## Figures", "", "PNG and PDF beside each other; each figure's data in the CSV of the same name.", ""]
    lines += [f"- [{p.stem}]({FIGURES_DIR}/{p.name}): {_caption(p.stem)}" for p in pngs]
    (run_dir / "summary.md").write_text(render_summary_markdown(summary) + "\n" + "\n".join(lines) + "\n")


def write_study_figures(study_dir: str | Path, table: pd.DataFrame, baseline: str, metrics: list[str]) -> list[Path]:
    """A forest plot per CV metric of the study's table (``forest_<metric>``), against ``baseline``."""
    from tus.figures.study import forest_figure

    names = {"accuracy": "Accuracy", "f1": "F1", "precision": "Precision", "recall": "Recall", "auroc": "AUROC"}
    written: list[Path] = []
    for metric in metrics:
        if f"{metric}_mean" not in table or table[f"{metric}_mean"].isna().all():
            continue
        written += save(forest_figure(table, metric, baseline, names.get(metric, metric)), Path(study_dir) / FIGURES_DIR, f"forest_{metric}")
    return written


def study_baseline(study_dir: Path, table: pd.DataFrame) -> str:
    """The baseline arm a study's forest plots used (their sidecar records it), else the first arm."""
    for sidecar in sorted((study_dir / FIGURES_DIR).glob("forest_*.csv")):
        rows = pd.read_csv(sidecar)
        if rows["baseline"].any():
            return str(rows.loc[rows["baseline"].astype(bool), "arm"].iloc[0])
    return str(table["arm"].iloc[0])


def write_pretrain_figures(run_dir: str | Path) -> list[Path]:
    """The UMAP of the held-out embeddings (``embeddings.csv``, coloured by organ, the last
    k-NN organ probe in the title), with a downstream manifest the UMAP of its images
    (``downstream_embeddings.csv``, coloured by label, the last downstream probe's AUROC in the
    title) and the probe curves over steps (``metrics.csv``)."""
    from tus.figures.embeddings import probe_figure, umap_figure

    run_dir = Path(run_dir)
    out = run_dir / FIGURES_DIR
    written: list[Path] = []
    metrics = pd.read_csv(run_dir / "metrics.csv") if (run_dir / "metrics.csv").is_file() else pd.DataFrame()
    if len(metrics) and any(c.startswith("probe/") for c in metrics.columns):
        written += save(probe_figure(metrics), out, "probes")
    embeddings_path = run_dir / EMBEDDINGS_FILE
    if embeddings_path.is_file():
        embeddings = pd.read_csv(embeddings_path, dtype={"sample_id": str, "organ": str})
        if len(embeddings) >= MIN_UMAP_POINTS:
            summary = _read_json(run_dir / "summary.json") or {}
            probe = (summary.get("probe") or [{}])[-1]
            accuracy = probe.get("probe/knn_organ_acc")
            written += save(umap_figure(embeddings, "organ", accuracy, summary.get("steps")), out, "umap")
    downstream_path = run_dir / DOWNSTREAM_EMBEDDINGS_FILE
    if downstream_path.is_file():
        embeddings = pd.read_csv(downstream_path, dtype={"sample_id": str, "organ": str, "label": str})
        if len(embeddings) >= MIN_UMAP_POINTS:
            summary = _read_json(run_dir / "summary.json") or {}
            auroc = ((summary.get("downstream_probe") or [{}])[-1]).get("probe/downstream_auroc")
            written += save(
                umap_figure(embeddings, "label", auroc, summary.get("steps"), probe_name=f"{_downstream_classifier(run_dir)} label probe {'macro ' if embeddings['label'].nunique() > 2 else ''}AUROC"),
                out,
                "umap_label",
            )
    return written


def _downstream_classifier(run_dir: Path) -> str:
    """How the run's downstream probe classified (``k-NN`` or ``logistic``), from its config."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    classifier = ((config or {}).get("monitor") or {}).get("downstream_classifier", "knn")
    return "k-NN" if classifier == "knn" else str(classifier)


def write_diffusion_figures(run_dir: str | Path, fid: float | None = None) -> list[Path]:
    """The last sample grid of a diffusion run with its caption (step, sampler, and the FID if
    given, else the one the previous rendering's ``samples.csv`` recorded)."""
    import yaml

    from tus.data.images import read_grayscale
    from tus.figures.samples import samples_figure

    run_dir = Path(run_dir)
    grids = sorted((run_dir / "sample_grids").glob("step_*.png"))
    if not grids:
        return []
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    samples = (config or {}).get("samples") or {}
    previous = run_dir / FIGURES_DIR / "samples.csv"
    if fid is None and previous.is_file():
        recorded = pd.read_csv(previous)["fid"].iloc[0]
        fid = None if pd.isna(recorded) else float(recorded)
    grid = grids[-1]
    figure = samples_figure(read_grayscale(grid), int(grid.stem.split("_")[1]), str(samples.get("sampler", "respaced")), int(samples.get("steps", 0)), fid, grid.name)
    written = save(figure, run_dir / FIGURES_DIR, "samples")
    return written


def figures_markdown(root: Path, run_dirs: list[Path], embed: tuple[str, ...] = ("roc", "calibration")) -> list[str]:
    """A report section: the ``embed`` figures shown, every figure of ``run_dirs`` linked (paths
    relative to ``root``, where the report lies)."""
    lines = ["## Figures", ""]
    pngs = [p for run_dir in run_dirs for p in sorted((Path(run_dir) / FIGURES_DIR).glob("*.png"))]
    for name in embed:
        for png in (p for p in pngs if p.stem == name):
            lines += [f"![{FIGURE_CAPTIONS.get(name, name)}]({png.relative_to(root)})", "", f"*{FIGURE_CAPTIONS.get(name, name)}.*", ""]
    lines += [f"- [{p.relative_to(root)}]({p.relative_to(root)})" for p in pngs]
    return [*lines, "", "Each figure has a PDF and its data as a CSV beside it; `tus report RUN_DIR` redraws them from the run's files.", ""]


def run_kind(run_dir: Path) -> str | None:
    """``cv``, ``study``, ``pretrain`` or ``diffusion`` from the files a run dir holds; None: none of them."""
    if (run_dir / "folds.csv").is_file() and (run_dir / "runs").is_dir():
        return "cv"
    if (run_dir / "table.csv").is_file():
        return "study"
    if (run_dir / "sample_grids").is_dir():
        return "diffusion"
    if (run_dir / "pool.json").is_file():
        return "pretrain"
    return None
