"""Figures a paper needs, as pure functions from tables to figures.

Each ``*_figure`` function takes the table(s) a stage already writes (predictions, metrics
logs, a study's comparison table, embeddings) and returns a :class:`FigureData`: the
matplotlib figure and the table of exactly what it draws. :func:`save` writes both beside
each other (``roc.png``, ``roc.pdf``, ``roc.csv``), with fixed metadata, so re-rendering a
finished run from its CSVs (``tus report``) gives byte-identical files.

Modules: :mod:`.style` (sizes, colour maps, deterministic saving), :mod:`.classification`
(ROC, PR, confusion, calibration, training curves), :mod:`.study` (forest plot),
:mod:`.embeddings` (UMAP, probe curves), :mod:`.samples` (diffusion sample grid) and
:mod:`.runs` (which figures a finished run dir gets, read from its files).

matplotlib (Agg, no pyplot) and umap-learn are imported inside the functions that need
them, so importing :mod:`tus.figures` keeps ``tus --help`` fast.
"""

from tus.figures.style import FigureData, save

__all__ = ["FigureData", "save"]
