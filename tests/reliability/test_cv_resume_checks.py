"""Resuming a CV run dir refuses a manifest whose images, labels or image contents changed,
naming the sample ids and what changed (``folds.csv`` records each file's content hash)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import make_labeled_dataset
from tus.data.folds import assign_folds
from tus.data.images import content_hash, read_grayscale, write_grayscale
from tus.data.manifest import load_manifest
from tus.stages.finetune_cv import ResumeMismatchError, write_or_check_folds


@pytest.fixture
def started(tmp_path: Path) -> tuple[Path, Path]:
    """(manifest, run dir whose folds.csv was written from it)."""
    manifest = make_labeled_dataset(tmp_path / "data", patients=12)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    check(manifest, run_dir)
    return manifest, run_dir


def check(manifest: Path, run_dir: Path) -> None:
    frame = load_manifest(manifest)
    write_or_check_folds(run_dir, frame, assign_folds(frame, 3, 0))


def test_folds_csv_records_each_file_content_hash(started):
    manifest, run_dir = started
    table = pd.read_csv(run_dir / "folds.csv")
    assert list(table.columns) == ["sample_id", "path", "patient_id", "label", "fold", "content_hash"]
    first = manifest.parent / table["path"][0]
    assert table["content_hash"][0] == content_hash(first)
    check(manifest, run_dir)  # the same manifest resumes


def test_changed_label_is_refused_naming_the_sample(started):
    manifest, run_dir = started
    frame = pd.read_csv(manifest)
    frame.loc[0, "label"] = 1 - frame.loc[0, "label"]
    frame.to_csv(manifest, index=False)
    with pytest.raises(ResumeMismatchError, match=rf"label of 1 image\(s\): {frame.loc[0, 'path']}") as error:
        check(manifest, run_dir)
    assert "image content" not in str(error.value)


def test_changed_image_content_is_refused_naming_the_sample(started):
    manifest, run_dir = started
    frame = pd.read_csv(manifest)
    path = manifest.parent / frame.loc[3, "path"]
    image = read_grayscale(path)
    write_grayscale(path, np.flipud(image).copy())
    with pytest.raises(ResumeMismatchError, match=rf"image content of 1 image\(s\): {frame.loc[3, 'path']}"):
        check(manifest, run_dir)


def test_removed_images_are_refused_naming_them(started):
    manifest, run_dir = started
    frame = pd.read_csv(manifest)
    frame.drop(index=[0, 1]).to_csv(manifest, index=False)
    with pytest.raises(ResumeMismatchError, match=rf"removed 2 image\(s\): {frame.loc[0, 'path']}, {frame.loc[1, 'path']}"):
        check(manifest, run_dir)


def test_run_dirs_without_hashes_are_still_checked_on_labels(started):
    manifest, run_dir = started
    table = pd.read_csv(run_dir / "folds.csv")
    table.drop(columns="content_hash").to_csv(run_dir / "folds.csv", index=False)
    check(manifest, run_dir)
    frame = pd.read_csv(manifest)
    frame.loc[5, "label"] = 1 - frame.loc[5, "label"]
    frame.to_csv(manifest, index=False)
    with pytest.raises(ResumeMismatchError, match="label of 1 image"):
        check(manifest, run_dir)
