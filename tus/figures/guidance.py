"""The classifier-free guidance trade-off: label faithfulness against FID across guidance scales w."""

from __future__ import annotations

import pandas as pd

from tus.figures.style import FigureData, colors, new_figure, style

COLUMNS = ["guidance", "fid", "faithfulness", "precision", "recall", "num_generated"]


def tradeoff_data(rows: list[dict]) -> pd.DataFrame:
    """The plotted table, one row per guidance scale (sorted by w): FID, label faithfulness (the share of
    samples a classifier trained on real images assigns to their conditioning label), precision, recall."""
    table = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in table.columns:
            table[column] = float("nan")
    return table[COLUMNS].astype(float).sort_values("guidance", ignore_index=True)


@style
def tradeoff_figure(data: pd.DataFrame) -> FigureData:
    """Faithfulness (y, %) against FID (x), one point per w joined in order of w and labelled with it."""
    figure, axis = new_figure(2.8)
    color = colors(2)[0]
    axis.plot(data["fid"], 100 * data["faithfulness"], marker="o", color=color, markersize=4, linewidth=1)
    for _, row in data.iterrows():
        axis.annotate(f"w={row['guidance']:g}", (row["fid"], 100 * row["faithfulness"]), textcoords="offset points", xytext=(4, 3), fontsize=6)
    axis.set_xlabel("FID (lower is better)")
    axis.set_ylabel("label faithfulness (%)")
    axis.set_title("classifier-free guidance: faithfulness vs FID")
    return FigureData(figure, data)
