"""A study's forest plot: each arm's difference from the baseline arm with its CI and p-value."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from tus.eval.statistics import format_p, significance_marker
from tus.figures.style import FigureData, colors, new_figure, style


def forest_data(table: pd.DataFrame, metric: str, baseline: str) -> pd.DataFrame:
    """Rows of the forest plot from a study's ``table.csv`` (values in %): each arm's mean and
    std, its mean paired difference from ``baseline`` (percentage points) with the bootstrap CI
    and the corrected resampled t-test's p-value (the baseline: difference 0, no p)."""
    rows = []
    for _, row in table.iterrows():
        is_baseline = row["arm"] == baseline
        rows.append(
            {
                "arm": row["arm"],
                "baseline": is_baseline,
                "mean": row.get(f"{metric}_mean", math.nan),
                "std": row.get(f"{metric}_std", math.nan),
                "diff": 0.0 if is_baseline else row.get(f"{metric}_diff", math.nan),
                "ci_low": 0.0 if is_baseline else row.get(f"{metric}_diff_ci_low", math.nan),
                "ci_high": 0.0 if is_baseline else row.get(f"{metric}_diff_ci_high", math.nan),
                "p": math.nan if is_baseline else row.get(f"{metric}_p", math.nan),
            }
        )
    return pd.DataFrame(rows, columns=["arm", "baseline", "mean", "std", "diff", "ci_low", "ci_high", "p"]).astype(
        {"mean": float, "std": float, "diff": float, "ci_low": float, "ci_high": float, "p": float}
    )


@style
def forest_figure_from_data(data: pd.DataFrame, metric_name: str) -> FigureData:
    figure, axis = new_figure(0.9 + 0.32 * max(len(data), 1))
    y = np.arange(len(data))[::-1]
    color = colors(2)[0]
    labels = []
    for position, (_, row) in zip(y, data.iterrows()):
        mean = "n/a" if math.isnan(row["mean"]) else f"{row['mean']:.1f} ± {row['std']:.1f}"
        labels.append(f"{row['arm']}{' (baseline)' if row['baseline'] else ''}\n{metric_name} {mean}")
        if row["baseline"] or math.isnan(row["diff"]):
            axis.plot([0], [position], marker="D", color="0.3", markersize=4)
            continue
        axis.errorbar(row["diff"], position, xerr=[[row["diff"] - row["ci_low"]], [row["ci_high"] - row["diff"]]], fmt="o", color=color, markersize=4, capsize=2)
        axis.annotate(f"{format_p(row['p'])}{significance_marker(row['p'])}", (1.02, position), xycoords=("axes fraction", "data"), va="center", fontsize=6)
    axis.axvline(0, color="0.3", linestyle=":", linewidth=0.8)
    axis.set_yticks(y, labels)
    axis.set_ylim(-0.6, len(data) - 0.4)
    axis.set_xlabel(f"Δ {metric_name} vs baseline (percentage points, 95% CI)")
    axis.set_title(f"{metric_name}: arms vs baseline; p: corrected resampled t-test")
    return FigureData(figure, data)


def forest_figure(table: pd.DataFrame, metric: str, baseline: str, metric_name: str | None = None) -> FigureData:
    return forest_figure_from_data(forest_data(table, metric, baseline), metric_name or metric)
