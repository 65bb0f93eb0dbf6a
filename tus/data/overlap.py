"""Leakage guard: images an unlabelled pool shares with the labelled set, per labelled fold.

The reference pipeline pretrains (and trains its diffusion model and the manifold filter's real
set) on pools that contain the labelled images, so test-fold images reach pretraining. Two
images are the same when their files are byte-identical (:func:`tus.data.images.content_hash`)
or, re-encoded (another PNG compression, a format change), when their decoded 8-bit pixels are
identical (:func:`pixel_hash`). :func:`find_overlap` lists the pool rows that match a labelled
image, with the labelled image's fold; :func:`exclude_labeled` drops them from a pool for a run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from tus.data.folds import assign_folds
from tus.data.images import content_hash, read_grayscale

ExcludeLabeled = Literal["none", "test_folds", "all"]
EXCLUDE_MODES = ("none", "test_folds", "all")
OVERLAP_COLUMNS = ["pool_path", "pool_sample_id", "labeled_path", "labeled_sample_id", "fold", "match"]


def pixel_hash(path: str | Path) -> str:
    """SHA-1 of the decoded (H, W) uint8 pixels and their shape: equal for re-encodings of one image."""
    pixels = read_grayscale(path)
    digest = hashlib.sha1(np.asarray(pixels.shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def image_hashes(paths: list[str]) -> pd.DataFrame:
    """``file_hash`` and ``pixel_hash`` of each path (one decode per distinct file)."""
    file_hashes = [content_hash(p) for p in paths]
    pixels: dict[str, str] = {}
    for path, file_hash in zip(paths, file_hashes):
        if file_hash not in pixels:  # byte-identical files decode to the same pixels
            pixels[file_hash] = pixel_hash(path)
    return pd.DataFrame({"file_hash": file_hashes, "pixel_hash": [pixels[h] for h in file_hashes]})


def labeled_folds(labeled: pd.DataFrame, num_folds: int | None = None, fold_seed: int = 0) -> np.ndarray:
    """The labelled images' folds: the manifest's ``fold`` column (e.g. a CV run's folds.csv), else
    :func:`tus.data.folds.assign_folds` with ``num_folds``/``fold_seed`` (as ``finetune-cv`` draws them)."""
    if "fold" in labeled.columns:
        return labeled["fold"].astype(int).to_numpy()
    if num_folds is None:
        raise ValueError("the labelled manifest has no 'fold' column; give the number of folds (and their seed) to assign them")
    return assign_folds(labeled, num_folds, fold_seed)


def find_overlap(pool: pd.DataFrame, labeled: pd.DataFrame, folds: np.ndarray) -> pd.DataFrame:
    """Pool rows whose image equals a labelled image: one row per (pool image, labelled image) pair.

    ``match`` is ``file`` for byte-identical files and ``pixels`` for re-encoded identical pixels.
    Both frames need ``abs_path`` and ``sample_id`` (as :func:`tus.data.manifest.load_manifest` gives).
    """
    pool_keys = image_hashes(pool["abs_path"].tolist()).assign(pool_path=pool["abs_path"].to_numpy(), pool_sample_id=pool["sample_id"].astype(str).to_numpy(), pool_row=np.arange(len(pool)))
    labeled_keys = image_hashes(labeled["abs_path"].tolist()).assign(
        labeled_path=labeled["abs_path"].to_numpy(), labeled_sample_id=labeled["sample_id"].astype(str).to_numpy(), fold=np.asarray(folds, dtype=int)
    )
    pairs = pool_keys.merge(labeled_keys, on="pixel_hash", suffixes=("_pool", "_labeled"))
    pairs["match"] = np.where(pairs["file_hash_pool"] == pairs["file_hash_labeled"], "file", "pixels")
    return pairs.sort_values(["pool_row", "fold", "labeled_sample_id"], kind="stable")[[*OVERLAP_COLUMNS, "pool_row"]].reset_index(drop=True)


def overlap_report(overlap: pd.DataFrame, folds: np.ndarray, pool_size: int) -> dict:
    """Per labelled fold: its images, how many of them are in the pool, and how they match."""
    per_fold = {}
    for fold in sorted(np.unique(folds).tolist()):
        rows = overlap[overlap["fold"] == fold]
        per_fold[int(fold)] = {
            "labeled_images": int((np.asarray(folds) == fold).sum()),
            "in_pool": int(rows["labeled_sample_id"].nunique()),
            "pool_images": int(rows["pool_row"].nunique()),
            "identical_files": int((rows["match"] == "file").sum()),
            "same_pixels": int((rows["match"] == "pixels").sum()),
        }
    return {
        "pool_images": int(pool_size),
        "labeled_images": int(len(folds)),
        "per_fold": per_fold,
        "labeled_in_pool": int(overlap["labeled_sample_id"].nunique()),
        "pool_images_shared": int(overlap["pool_row"].nunique()),
    }


def format_overlap(report: dict) -> str:
    """One line per fold and a total, for ``tus data overlap``."""
    lines = [
        f"fold {fold}: {r['in_pool']} of {r['labeled_images']} labelled images in the pool ({r['pool_images']} pool images; {r['identical_files']} identical files, {r['same_pixels']} re-encoded)"
        for fold, r in report["per_fold"].items()
    ]
    lines.append(
        f"total: {report['labeled_in_pool']} of {report['labeled_images']} labelled images in the pool; {report['pool_images_shared']} of {report['pool_images']} pool images are labelled images"
    )
    return "\n".join(lines)


def exclude_labeled(pool: pd.DataFrame, overlap: pd.DataFrame, mode: ExcludeLabeled, test_folds: list[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pool without the excluded rows, the overlap rows that were excluded).

    ``test_folds``: drop pool images equal to a labelled image of one of ``test_folds``;
    ``all``: drop every pool image equal to any labelled image; ``none``: drop nothing.
    """
    if mode not in EXCLUDE_MODES:
        raise ValueError(f"exclude_labeled must be one of {', '.join(EXCLUDE_MODES)}, got {mode!r}")
    if mode == "test_folds" and not test_folds:
        raise ValueError("exclude_labeled: test_folds needs the list of test folds (test_folds: [0, 1, 2])")
    if mode == "none":
        return pool, overlap.iloc[:0]
    excluded = overlap if mode == "all" else overlap[overlap["fold"].isin(list(test_folds or []))]
    keep = ~np.isin(np.arange(len(pool)), excluded["pool_row"].to_numpy())
    return pool[keep].reset_index(drop=True), excluded.reset_index(drop=True)
