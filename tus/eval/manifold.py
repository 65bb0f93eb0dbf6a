"""k-NN manifold geometry on feature vectors (TesticulUS Algorithm 1, Kynkäänniemi et al. 2019).

The real manifold is the union of balls B(r_i, radius_i), radius_i being the distance from
real point r_i to its k-th nearest *other* real point. A generated point g lies inside when
min_i ||g - r_i|| / radius_i <= 1; a point exactly on a sphere counts as inside.

Everything works on blocks of rows, so memory stays at ``block_size`` x (number of real
points) distances whatever the number of generated points (by default a block holds
2^25 distances, 128 MiB): 25k real x 1M generated 2048-d
features never form the 25k x 1M matrix. Squared distances come from one matrix product per
block, ||a||^2 + ||b||^2 - 2 a.b, in float32 (the same expansion torch.cdist uses for large
inputs); its rounding is about 1e-6 of the squared norms, so only points that close to a
sphere can fall on either side. Integer-valued inputs are computed exactly.

Exact duplicates: a point is excluded from its own neighbours by index, not by distance, so
its copies are neighbours at distance 0, as in Kynkäänniemi et al.'s reference code and
torch-fidelity. A point with k or more exact copies therefore has radius 0: its ball is the
point itself, which contains only generated points equal to it.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

# Default distance block: 2^25 float32 distances (128 MiB). Blocks much smaller than this
# make the matrix products too thin to run at full speed on a CPU.
BLOCK_ELEMENTS = 1 << 25


def _rows_per_block(block_size: int | None, columns: int) -> int:
    if block_size is None:
        return max(1, BLOCK_ELEMENTS // max(1, columns))
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return block_size


def _as_matrix(points: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(points)
    if tensor.dim() != 2:
        raise ValueError(f"{name}: expected a (N, D) array, got shape {tuple(tensor.shape)}")
    return tensor.to(torch.float32).contiguous()


def _squared_distances(rows: torch.Tensor, columns: torch.Tensor, column_sq_norms: torch.Tensor) -> torch.Tensor:
    """(len(rows), len(columns)) squared Euclidean distances, clamped at 0 against rounding."""
    squared = torch.addmm(column_sq_norms.unsqueeze(0), rows, columns.T, alpha=-2.0)
    squared.add_(rows.pow(2).sum(dim=1, keepdim=True))
    return squared.clamp_(min=0.0)


def kth_neighbour_radii(real: np.ndarray | torch.Tensor, k: int, block_size: int | None = None) -> np.ndarray:
    """Distance from every real point to its k-th nearest other real point, as float32 (N,).

    ``block_size`` real rows are processed at a time (None: as many as fill 128 MiB).
    """
    points = _as_matrix(real, "real")
    count = points.shape[0]
    if not 1 <= k < count:
        raise ValueError(f"k must be between 1 and the number of real points - 1 ({count - 1}), got {k}")
    block_size = _rows_per_block(block_size, count)
    sq_norms = points.pow(2).sum(dim=1)
    radii = torch.empty(count, dtype=torch.float32)
    for start in range(0, count, block_size):
        stop = min(start + block_size, count)
        squared = _squared_distances(points[start:stop], points, sq_norms)
        local = torch.arange(stop - start)
        squared[local, local + start] = float("inf")  # the point itself is not its own neighbour
        radii[start:stop] = torch.kthvalue(squared, k, dim=1).values.sqrt_()
    return radii.numpy()


def manifold_membership(
    real: np.ndarray | torch.Tensor,
    radii: np.ndarray | torch.Tensor,
    generated: np.ndarray | torch.Tensor,
    block_size: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Which generated points lie inside the union of real balls, and by what margin.

    Returns ``(inside, min_ratio)``: ``min_ratio[j] = min_i ||g_j - r_i|| / radii[i]`` (0 for a
    point on a radius-0 ball's centre, inf if it is in no ball and every radius is 0) and
    ``inside = min_ratio <= 1``. ``block_size`` generated rows are compared at a time (None:
    as many as fill a 128 MiB block of distances).
    """
    points = _as_matrix(real, "real")
    queries = _as_matrix(generated, "generated")
    radii_t = torch.as_tensor(radii).to(torch.float32).reshape(-1)
    if radii_t.shape[0] != points.shape[0]:
        raise ValueError(f"{radii_t.shape[0]} radii for {points.shape[0]} real points")
    if queries.shape[0] and queries.shape[1] != points.shape[1]:
        raise ValueError(f"generated dimension {queries.shape[1]} != real dimension {points.shape[1]}")
    block_size = _rows_per_block(block_size, points.shape[0])
    sq_norms = points.pow(2).sum(dim=1)
    sq_radii = radii_t.pow(2)
    has_zero_radius = bool((sq_radii == 0).any())
    min_sq_ratio = torch.empty(queries.shape[0], dtype=torch.float32)
    starts = range(0, queries.shape[0], block_size)
    for start in tqdm(starts, desc="manifold membership", unit="block", disable=not progress):
        stop = min(start + block_size, queries.shape[0])
        ratios = _squared_distances(queries[start:stop], points, sq_norms).div_(sq_radii)
        if has_zero_radius:
            # 0 / 0 is a generated point exactly on a radius-0 ball's centre: inside.
            ratios.nan_to_num_(nan=0.0, posinf=float("inf"))
        min_sq_ratio[start:stop] = ratios.amin(dim=1)
    min_ratio = min_sq_ratio.sqrt_()
    return (min_ratio <= 1.0).numpy(), min_ratio.numpy()


def improved_precision_recall(
    real: np.ndarray | torch.Tensor,
    fake: np.ndarray | torch.Tensor,
    k: int = 3,
    block_size: int | None = None,
) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) of ``fake`` against ``real``.

    Precision: fraction of fake points inside the real manifold (k-NN balls of the real set).
    Recall: fraction of real points inside the fake manifold (k-NN balls of the fake set).
    Same definition as torch-fidelity's ``prc`` (``prc_neighborhood=k``).
    """
    real_t = _as_matrix(real, "real")
    fake_t = _as_matrix(fake, "fake")
    inside_real, _ = manifold_membership(real_t, kth_neighbour_radii(real_t, k, block_size), fake_t, block_size)
    inside_fake, _ = manifold_membership(fake_t, kth_neighbour_radii(fake_t, k, block_size), real_t, block_size)
    return {"precision": float(inside_real.mean()), "recall": float(inside_fake.mean())}
