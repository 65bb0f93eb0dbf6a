"""The diffusion run's sample grid with a caption saying what it shows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from tus.figures.style import COLUMN_WIDTH_IN, FigureData, new_figure, style


@style
def samples_figure(grid: np.ndarray, step: int, sampler: str, sampling_steps: int, fid: float | None = None, image: str = "") -> FigureData:
    """``grid``: the 8-bit grayscale grid image the diffusion run wrote (``sample_grids/step_N.png``).
    The caption gives the training step, the sampler and its steps, and the FID when computed."""
    height, width = grid.shape[:2]
    figure, axis = new_figure(COLUMN_WIDTH_IN * height / width + 0.6)
    axis.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest", aspect="equal")
    axis.set_axis_off()
    caption = f"EMA samples at training step {step}; sampler {sampler}, {sampling_steps} steps"
    if fid is not None and not math.isnan(fid):
        caption += f"; FID {fid:.1f}"
    axis.set_title(caption)
    data = pd.DataFrame([{"image": image, "step": step, "sampler": sampler, "sampling_steps": sampling_steps, "fid": math.nan if fid is None else fid, "height_px": height, "width_px": width}])
    return FigureData(figure, data)
