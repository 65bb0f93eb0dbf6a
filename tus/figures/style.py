"""House style and deterministic saving of figures.

Sizes are for one column of a two-column paper (3.5 in wide), fonts readable at that size,
colour maps perceptually uniform (viridis for sequences and categories, cividis for
heatmaps). Files carry no creation dates or software versions, so the same table renders to
the same bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLUMN_WIDTH_IN = 3.5
DPI = 200
FORMATS = ("png", "pdf")
SEQUENCE_CMAP = "viridis"
HEATMAP_CMAP = "cividis"
RC: Any = {  # matplotlib types rcParams keys as literals
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "legend.fontsize": 6,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "lines.linewidth": 1.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "tus",
    "pdf.fonttype": 42,
}
# No dates, versions or producers in the files: identical tables give identical bytes.
METADATA = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
    "svg": {"Date": None, "Creator": None},
}


@dataclass
class FigureData:
    """A figure and the table of what it shows (written as its sidecar CSV)."""

    figure: Figure
    data: pd.DataFrame


def new_figure(height_in: float = 2.8, width_in: float = COLUMN_WIDTH_IN, **subplots: Any) -> tuple[Figure, Any]:
    """A figure one column wide (no pyplot: nothing global, thread-safe) and its axes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    with matplotlib.rc_context(RC):
        figure = Figure(figsize=(width_in, height_in), layout="constrained", dpi=DPI)
        axes = figure.subplots(**subplots)
    return figure, axes


def style(function):
    """Run a figure function under the house rcParams (fonts are read when artists are made)."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context(RC):
            return function(*args, **kwargs)

    return wrapper


def colors(count: int, cmap: str = SEQUENCE_CMAP) -> list:
    """``count`` distinct colours from a perceptually uniform map (its yellow end left out)."""
    import matplotlib

    colormap = matplotlib.colormaps[cmap]
    return [colormap(0.85 * i / max(count - 1, 1)) for i in range(count)]


# TUS_FIGURE_FORMATS=png (a comma-separated list of png, pdf, svg) writes fewer formats: a PDF
# costs ~0.5 s more than its PNG (matplotlib subsets the embedded TrueType font with fontTools),
# ~5 s a CV run and most of a test suite's figure time; `tus report` writes them later.
FORMATS_ENV = "TUS_FIGURE_FORMATS"
KNOWN_FORMATS = ("png", "pdf", "svg")


def figure_formats() -> tuple[str, ...]:
    """The formats every figure is written in: ``TUS_FIGURE_FORMATS`` or PNG and PDF."""
    value = os.environ.get(FORMATS_ENV, "").strip()
    if not value:
        return FORMATS
    formats = tuple(dict.fromkeys(f.strip().lower() for f in value.split(",") if f.strip()))
    unknown = [f for f in formats if f not in KNOWN_FORMATS]
    if unknown or not formats:
        raise ValueError(f"{FORMATS_ENV}={value!r}: give a comma-separated list of {', '.join(KNOWN_FORMATS)}")
    return formats


def save(result: FigureData, folder: str | Path, name: str, formats: tuple[str, ...] | None = None) -> list[Path]:
    """Write ``<name>.png``/``.pdf`` (``formats``, default :func:`figure_formats`) and the sidecar
    ``<name>.csv``; return the paths."""
    import matplotlib

    formats = figure_formats() if formats is None else formats
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    figure = result.figure
    engine = figure.get_layout_engine()
    with matplotlib.rc_context(RC):
        try:
            for extension in formats:
                path = folder / f"{name}.{extension}"
                temporary = path.with_name(f".{path.name}.partial")
                figure.savefig(temporary, format=extension, metadata=METADATA.get(extension), dpi=DPI)
                temporary.replace(path)
                paths.append(path)
                # Lay the figure out once: the first format's draw placed the axes, and every
                # later format keeps those positions instead of solving the constrained layout
                # again (~0.1 s a figure; the PDF then matches the PNG to the point).
                if engine is not None:
                    figure.set_layout_engine("none")
        finally:
            if engine is not None:
                figure.set_layout_engine(engine)
    csv = folder / f"{name}.csv"
    result.data.to_csv(csv, index=False, float_format="%.6g")
    paths.append(csv)
    return paths
