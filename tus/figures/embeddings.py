"""Figures of a pretraining run: a UMAP of held-out embeddings and the probes over steps."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from tus.figures.style import FigureData, colors, new_figure, style

FEATURE_PREFIX = "f"


def feature_columns(embeddings: pd.DataFrame) -> list[str]:
    return [c for c in embeddings.columns if c.startswith(FEATURE_PREFIX) and c[len(FEATURE_PREFIX) :].isdigit()]


def umap_data(embeddings: pd.DataFrame, seed: int = 0, n_neighbors: int = 15) -> pd.DataFrame:
    """2-D UMAP (cosine metric, ``random_state`` fixed and one thread: reproducible) of an
    embeddings table (``sample_id``, ``organ`` and feature columns ``f0..fN``); returns the table's
    non-feature columns with ``umap_x``, ``umap_y``. Small sets get fewer neighbours."""
    import umap

    features = embeddings[feature_columns(embeddings)].to_numpy(dtype=np.float32)
    neighbours = max(2, min(n_neighbors, len(features) - 1))
    reducer = umap.UMAP(n_neighbors=neighbours, n_components=2, metric="cosine", random_state=seed, n_jobs=1, init="spectral" if len(features) > neighbours + 2 else "random")
    coords = reducer.fit_transform(features)
    keep = [c for c in embeddings.columns if c not in feature_columns(embeddings)]
    return embeddings[keep].reset_index(drop=True).assign(umap_x=coords[:, 0].astype(float), umap_y=coords[:, 1].astype(float))


@style
def umap_figure_from_data(data: pd.DataFrame, color_by: str = "organ", knn_accuracy: float | None = None, step: int | None = None, probe_name: str | None = None) -> FigureData:
    """Points coloured by ``color_by``; the title gives the step and the probe's value
    (``probe_name``, default "k-NN <color_by> accuracy"), which the sidecar also records
    (columns ``probe``, ``probe_value``)."""
    figure, axis = new_figure(3.2)
    groups = sorted(data[color_by].astype(str).unique())
    for color, group in zip(colors(len(groups)), groups):
        rows = data[data[color_by].astype(str) == group]
        axis.scatter(
            rows["umap_x"], rows["umap_y"], s=6, color=color, label=f"{color_by} {group} (n = {len(rows)})" if color_by == "label" and group.isdigit() else f"{group} (n = {len(rows)})", linewidths=0
        )
    title = f"Held-out embeddings by {color_by}" if color_by == "organ" else f"Downstream images' embeddings by {color_by}"
    details = [f"step {step}"] if step is not None else []
    probe_name = probe_name or f"k-NN {color_by} accuracy"
    shown = knn_accuracy is not None and not math.isnan(knn_accuracy)
    if shown:
        details.append(f"{probe_name} {knn_accuracy:.1%}" if "accuracy" in probe_name else f"{probe_name} {knn_accuracy:.3f}")
    data = data.assign(probe=probe_name, probe_value=knn_accuracy if shown else float("nan"))
    axis.set_title(title + (f"\n{', '.join(details)}" if details else ""))
    axis.set_xlabel("UMAP 1 (a.u.)")
    axis.set_ylabel("UMAP 2 (a.u.)")
    axis.set_aspect("equal", adjustable="datalim")
    axis.legend(markerscale=2, loc="best")
    return FigureData(figure, data)


def umap_figure(embeddings: pd.DataFrame, color_by: str = "organ", knn_accuracy: float | None = None, step: int | None = None, seed: int = 0, probe_name: str | None = None) -> FigureData:
    return umap_figure_from_data(umap_data(embeddings, seed), color_by, knn_accuracy, step, probe_name)


PROBE_LABELS = {
    "probe/knn_organ_acc": "k-NN organ accuracy (held out)",
    "probe/head_organ_acc": "organ-head accuracy (held out)",
    "probe/downstream_auroc": "downstream probe AUROC",
}


def probe_data(metrics: pd.DataFrame) -> pd.DataFrame:
    """The probes' values over steps from a run's Lightning ``metrics.csv`` (long format:
    ``probe``, ``step``, ``value``)."""
    rows = []
    for column in PROBE_LABELS:
        if column in metrics and "step" in metrics:
            values = metrics[["step", column]].dropna().drop_duplicates("step", keep="last").sort_values("step")
            rows.append(pd.DataFrame({"probe": column, "step": values["step"].astype(int), "value": values[column].astype(float)}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["probe", "step", "value"])


@style
def probe_figure_from_data(data: pd.DataFrame) -> FigureData:
    figure, axis = new_figure(2.4)
    probes = [p for p in PROBE_LABELS if p in set(data["probe"])]
    for color, probe in zip(colors(len(probes)), probes):
        rows = data[data["probe"] == probe]
        axis.plot(rows["step"], rows["value"], marker="o", markersize=2.5, color=color, label=PROBE_LABELS[probe])
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("accuracy / AUROC (fraction)")
    axis.set_ylim(0, 1.02)
    axis.set_title("Representation probes during pretraining")
    if probes:
        axis.legend(loc="lower right")
    return FigureData(figure, data)


def probe_figure(metrics: pd.DataFrame) -> FigureData:
    return probe_figure_from_data(probe_data(metrics))
