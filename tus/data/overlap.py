"""Leakage guard: images an unlabelled pool shares with the labelled set, per labelled fold.

The reference pipeline pretrains (and trains its diffusion model and the manifold filter's real
set) on pools that contain the labelled images, so test-fold images reach pretraining. A pool
image belongs to a labelled image's fold when

- ``file``: its file is byte-identical (:func:`tus.data.images.content_hash`);
- ``pixels``: re-encoded losslessly (another PNG compression, a format change), its decoded
  8-bit pixels are identical (:func:`pixel_hash`);
- ``near``: it is a near duplicate (a JPEG re-encode, resized, brightened, cropped by a few
  percent, mirrored: :mod:`tus.data.near_duplicates`), ``distance`` bits of 256 apart;
- ``patient``: the pool carries ``patient_id`` (the labelled set's ids) and it is an image of a
  labelled patient, e.g. another frame of the exam;
- ``near_patient``: it is a near duplicate of such a pool image of a labelled patient.

:func:`find_overlap` lists these pairs with the labelled side's fold; :func:`exclude_labeled`
drops them from a pool for a run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from tus.data.folds import assign_folds
from tus.data.images import content_hash, read_grayscale, split_frame
from tus.data.near_duplicates import NearDuplicateConfig, hash_files, near_duplicate_pairs

ExcludeLabeled = Literal["none", "test_folds", "all"]
EXCLUDE_MODES = ("none", "test_folds", "all")
OVERLAP_COLUMNS = ["pool_path", "pool_sample_id", "labeled_path", "labeled_sample_id", "labeled_patient_id", "fold", "match", "distance"]
MATCHES = ("file", "pixels", "near", "patient", "near_patient")


def pixel_hash(path: str | Path) -> str:
    """SHA-1 of the decoded (H, W) uint8 pixels and their shape: equal for re-encodings of one image."""
    pixels = read_grayscale(path)
    digest = hashlib.sha1(np.asarray(pixels.shape, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def image_hashes(paths: list[str]) -> pd.DataFrame:
    """``file_hash`` and ``pixel_hash`` of each path (one decode per distinct file).

    Kept in memory per (file, frame, size, modification time), as :func:`hash_files` keeps its
    hashes: a per-fold pool exclusion hashes the same pool once per fold (a third of
    benchmarks/real_data.py's pool preparation on BUSI + DDTI was hashing again)."""
    file_hashes = []
    for path in paths:
        key = _file_key(path)
        if key not in _FILE_HASH:
            _FILE_HASH[key] = content_hash(path)
        file_hashes.append(_FILE_HASH[key])
    for path, file_hash in zip(paths, file_hashes):
        if file_hash not in _PIXEL_HASH:  # byte-identical files decode to the same pixels
            _PIXEL_HASH[file_hash] = pixel_hash(path)
    return pd.DataFrame({"file_hash": file_hashes, "pixel_hash": [_PIXEL_HASH[h] for h in file_hashes]})


def _file_key(path: str) -> tuple:
    file, frame = split_frame(path)
    stat = Path(file).stat()
    return (str(Path(file).resolve()), frame, stat.st_size, stat.st_mtime_ns)


_FILE_HASH: dict[tuple, str] = {}  # (file, frame, size, mtime) -> SHA-1 of the bytes
_PIXEL_HASH: dict[str, str] = {}  # SHA-1 of the bytes -> SHA-1 of the decoded pixels


def labeled_folds(labeled: pd.DataFrame, num_folds: int | None = None, fold_seed: int = 0) -> np.ndarray:
    """The labelled images' folds: the manifest's ``fold`` column (e.g. a CV run's folds.csv), else
    :func:`tus.data.folds.assign_folds` with ``num_folds``/``fold_seed`` (as ``finetune-cv`` draws them)."""
    if "fold" in labeled.columns:
        return labeled["fold"].astype(int).to_numpy()
    if num_folds is None:
        raise ValueError("the labelled manifest has no 'fold' column; give the number of folds (and their seed) to assign them")
    return assign_folds(labeled, num_folds, fold_seed)


def carries_patient_ids(frame: pd.DataFrame) -> np.ndarray:
    """Rows whose manifest gave a ``patient_id`` (:func:`tus.data.manifest.load_manifest` fills a missing one
    with the row's ``sample_id``, which names no patient)."""
    if "patient_id" not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    return (frame["patient_id"].astype(str) != frame["sample_id"].astype(str)).to_numpy()


def find_overlap(pool: pd.DataFrame, labeled: pd.DataFrame, folds: np.ndarray, near: NearDuplicateConfig | None = NearDuplicateConfig()) -> pd.DataFrame:
    """Pool rows that are a labelled image, a near duplicate of one, or an image of a labelled patient:
    one row per (pool image, labelled image) pair, or per (pool image, labelled patient) for
    ``patient``/``near_patient`` matches (their ``labeled_path``/``labeled_sample_id`` are empty).

    ``match`` is one of :data:`MATCHES` (see the module docstring); ``distance`` is the near
    duplicate's Hamming distance (0 for ``file``/``pixels``, -1 for ``patient``). ``near=None``
    finds identical files and pixels only. Both frames need ``abs_path`` and ``sample_id`` (as
    :func:`tus.data.manifest.load_manifest` gives).
    """
    folds = np.asarray(folds, dtype=int)
    pool_keys = image_hashes(pool["abs_path"].tolist()).assign(pool_path=pool["abs_path"].to_numpy(), pool_sample_id=pool["sample_id"].astype(str).to_numpy(), pool_row=np.arange(len(pool)))
    labeled_patients = labeled["patient_id"].astype(str).to_numpy() if "patient_id" in labeled.columns else labeled["sample_id"].astype(str).to_numpy()
    labeled_keys = image_hashes(labeled["abs_path"].tolist()).assign(
        labeled_path=labeled["abs_path"].to_numpy(), labeled_sample_id=labeled["sample_id"].astype(str).to_numpy(), labeled_patient_id=labeled_patients, fold=folds, labeled_row=np.arange(len(labeled))
    )
    pairs = pool_keys.merge(labeled_keys, on="pixel_hash", suffixes=("_pool", "_labeled"))
    pairs["match"] = np.where(pairs["file_hash_pool"] == pairs["file_hash_labeled"], "file", "pixels")
    pairs["distance"] = 0
    found = [pairs]
    if near is not None and len(pool) and len(labeled):
        pool_hashes = hash_files(pool["abs_path"].tolist(), near)
        close = near_duplicate_pairs(pool_hashes, hash_files(labeled["abs_path"].tolist(), near), near.max_distance)
        exact = set(zip(pairs["pool_row"], pairs["labeled_row"]))
        close = close[np.array([(a, b) not in exact for a, b in zip(close["a_row"], close["b_row"])], dtype=bool)]
        found.append(
            pool_keys.iloc[close["a_row"].to_numpy()]
            .reset_index(drop=True)
            .join(labeled_keys.iloc[close["b_row"].to_numpy()].reset_index(drop=True), lsuffix="_pool", rsuffix="_labeled")
            .assign(match="near", distance=close["distance"].to_numpy())
        )
    patient_rows = _patient_matches(pool, pool_keys, labeled_patients, folds)
    if len(patient_rows):
        found.append(patient_rows)
        if near is not None:
            found.append(_near_patient_matches(pool, pool_keys, patient_rows, near))
    overlap = pd.concat([f for f in found if len(f)] or [pairs], ignore_index=True)
    for column in ("labeled_path", "labeled_sample_id", "labeled_patient_id"):
        overlap[column] = overlap[column].fillna("").astype(str)
    overlap = overlap.drop_duplicates(["pool_row", "labeled_sample_id", "labeled_patient_id", "match"])
    return overlap.sort_values(["pool_row", "fold", "labeled_sample_id"], kind="stable")[[*OVERLAP_COLUMNS, "pool_row"]].reset_index(drop=True)


def _patient_matches(pool: pd.DataFrame, pool_keys: pd.DataFrame, labeled_patients: np.ndarray, folds: np.ndarray) -> pd.DataFrame:
    """One row per pool image whose ``patient_id`` is a labelled patient's (with that patient's fold)."""
    fold_of = dict(zip(labeled_patients, folds))
    carries = carries_patient_ids(pool)
    pool_patients = pool["patient_id"].astype(str).to_numpy() if "patient_id" in pool.columns else np.array([""] * len(pool))
    rows = [i for i in range(len(pool)) if carries[i] and pool_patients[i] in fold_of]
    return pool_keys.iloc[rows].assign(labeled_path="", labeled_sample_id="", labeled_patient_id=pool_patients[rows], fold=[int(fold_of[pool_patients[i]]) for i in rows], match="patient", distance=-1)


def _near_patient_matches(pool: pd.DataFrame, pool_keys: pd.DataFrame, patient_rows: pd.DataFrame, near: NearDuplicateConfig) -> pd.DataFrame:
    """Pool images (of no labelled patient) that are near duplicates of a pool image of a labelled patient."""
    hashes = hash_files(pool["abs_path"].tolist(), near)
    seeds = patient_rows["pool_row"].to_numpy()
    close = near_duplicate_pairs(hashes, hashes.subset(seeds), near.max_distance)
    close = close[~np.isin(close["a_row"], seeds)]
    source = patient_rows.iloc[close["b_row"].to_numpy()].reset_index(drop=True)
    return (
        pool_keys.iloc[close["a_row"].to_numpy()]
        .reset_index(drop=True)
        .assign(
            labeled_path="",
            labeled_sample_id="",
            labeled_patient_id=source["labeled_patient_id"].to_numpy(),
            fold=source["fold"].to_numpy(),
            match="near_patient",
            distance=close["distance"].to_numpy(),
        )
    )


def overlap_report(overlap: pd.DataFrame, folds: np.ndarray, pool_size: int) -> dict:
    """Per labelled fold: its images, how many of them are in the pool, and how the pool images match."""
    per_fold = {}
    images = overlap[overlap["labeled_sample_id"] != ""]
    for fold in sorted(np.unique(folds).tolist()):
        rows = overlap[overlap["fold"] == fold]
        per_fold[int(fold)] = {
            "labeled_images": int((np.asarray(folds) == fold).sum()),
            "in_pool": int(images.loc[images["fold"] == fold, "labeled_sample_id"].nunique()),
            "pool_images": int(rows["pool_row"].nunique()),
            "identical_files": int((rows["match"] == "file").sum()),
            "same_pixels": int((rows["match"] == "pixels").sum()),
            "near_duplicates": int(rows.loc[rows["match"] == "near", "pool_row"].nunique()),
            "same_patient": int(rows.loc[rows["match"].isin(["patient", "near_patient"]), "pool_row"].nunique()),
        }
    return {
        "pool_images": int(pool_size),
        "labeled_images": int(len(folds)),
        "per_fold": per_fold,
        "labeled_in_pool": int(images["labeled_sample_id"].nunique()),
        "pool_images_shared": int(overlap["pool_row"].nunique()),
    }


def format_overlap(report: dict) -> str:
    """One line per fold and a total, for ``tus data overlap``."""
    lines = [
        f"fold {fold}: {r['in_pool']} of {r['labeled_images']} labelled images in the pool ({r['pool_images']} pool images; "
        f"{r['identical_files']} identical files, {r['same_pixels']} re-encoded, {r['near_duplicates']} near duplicates, {r['same_patient']} of the fold's patients)"
        for fold, r in report["per_fold"].items()
    ]
    lines.append(
        f"total: {report['labeled_in_pool']} of {report['labeled_images']} labelled images in the pool; {report['pool_images_shared']} of {report['pool_images']} pool images are labelled images, their near duplicates or their patients' images"
    )
    return "\n".join(lines)


def format_matches(overlap: pd.DataFrame, limit: int = 20) -> str:
    """The matched pairs, one line each (``tus data overlap --list``)."""
    lines = []

    def shown(path: str) -> str:  # relative to the working directory where it lies below it
        return os.path.relpath(path) if path and Path(path).resolve().is_relative_to(Path.cwd()) else path

    for row in overlap.head(limit).itertuples():
        target = shown(row.labeled_path) if row.labeled_path else f"patient {row.labeled_patient_id}"
        distance = f" ({row.distance} of 256 bits)" if row.match in ("near", "near_patient") else ""
        lines.append(f"  {shown(row.pool_path)} ~ {target}: {row.match}{distance}, fold {row.fold}")
    if len(overlap) > limit:
        lines.append(f"  ... and {len(overlap) - limit} more")
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
