"""Pool exclusion against a real CV fold table: for every choice of test folds, exactly the labelled
images of those folds leave the pretraining and diffusion pools, and nothing else does.

tests/data/test_overlap.py plants a few duplicates with hand-set folds; here the folds come from
:func:`tus.data.folds.assign_folds` (patients with several images, as ``finetune-cv`` writes
``folds.csv``) and the pool holds a copy of *every* labelled image, so each fold is checked.
"""

from __future__ import annotations

import shutil
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tus.data.datamodules import ImageSourceConfig
from tus.data.folds import assign_folds, fold_table
from tus.data.images import write_grayscale
from tus.data.manifest import load_manifest
from tus.data.pools import DiffusionDataConfig, DiffusionDataModule, PretrainDataConfig, PretrainDataModule

NUM_FOLDS = 3


@pytest.fixture
def pool_and_folds(tmp_path) -> tuple[Path, Path, pd.DataFrame]:
    """12 patients (1-2 images each) in 3 folds; a pool of 4 unlabelled images + a copy of every labelled one."""
    rng = np.random.default_rng(1)
    rows = []
    for patient in range(12):
        for view in range(1 + patient % 2):
            name = f"p{patient}_{view}.png"
            write_grayscale(tmp_path / "labeled" / name, rng.integers(0, 255, (16, 16), dtype=np.uint8))
            rows.append({"path": name, "patient_id": f"P{patient}", "label": int(patient % 3 == 0)})
    pd.DataFrame(rows).to_csv(tmp_path / "labeled" / "manifest.csv", index=False)
    frame = load_manifest(tmp_path / "labeled" / "manifest.csv", num_folds=NUM_FOLDS)
    table = fold_table(frame, assign_folds(frame, NUM_FOLDS, seed=0))
    table["path"] = frame["abs_path"].to_numpy()  # folds.csv beside the run, pointing at the images
    folds_csv = tmp_path / "run" / "folds.csv"
    folds_csv.parent.mkdir()
    table.to_csv(folds_csv, index=False)

    pool = tmp_path / "pool"
    for i in range(4):
        write_grayscale(pool / f"own{i}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
    for name in table["path"].map(lambda p: Path(p).name):
        shutil.copy(tmp_path / "labeled" / name, pool / f"copy_{name}")
    names = sorted(p.name for p in pool.iterdir())
    pd.DataFrame({"path": names, "organ": "breast"}).to_csv(pool / "manifest.csv", index=False)
    return pool / "manifest.csv", folds_csv, table


def pool_names(module) -> set[str]:
    return {Path(p).name for p in module.prepare_frames()[0]["abs_path"]}


def copies_of(table: pd.DataFrame, folds: list[int]) -> set[str]:
    return {f"copy_{Path(p).name}" for p in table.loc[table["fold"].isin(folds), "path"]}


@pytest.mark.parametrize("test_folds", [list(c) for r in (1, 2) for c in combinations(range(NUM_FOLDS), r)])
def test_exactly_the_test_fold_images_leave_the_pool(pool_and_folds, test_folds):
    pool, folds_csv, table = pool_and_folds
    everything = {"own0.png", "own1.png", "own2.png", "own3.png"} | copies_of(table, list(range(NUM_FOLDS)))
    options = {"exclude_labeled": "test_folds", "labeled_manifest": str(folds_csv), "test_folds": test_folds}
    source = [ImageSourceConfig(manifest=str(pool))]
    pretrain = PretrainDataModule(PretrainDataConfig(sources=source, image_size=16, cache_images=False, **options), seed=0)
    diffusion = DiffusionDataModule(DiffusionDataConfig(sources=source, image_size=16, cache_images=False, **options), seed=0)
    removed = copies_of(table, test_folds)
    assert removed  # every fold holds images
    for module in (pretrain, diffusion):
        assert pool_names(module) == everything - removed
        record = module.pool_report()["excluded_labeled"]
        assert record["excluded_images"] == len(removed)
        assert {Path(r["pool_path"]).name for r in record["excluded"]} == removed
        assert {int(r["fold"]) for r in record["excluded"]} == set(test_folds)


def test_all_removes_every_labelled_image_and_none_removes_nothing(pool_and_folds):
    pool, folds_csv, table = pool_and_folds
    source = [ImageSourceConfig(manifest=str(pool))]
    own = {"own0.png", "own1.png", "own2.png", "own3.png"}
    every_fold = PretrainDataModule(
        PretrainDataConfig(sources=source, image_size=16, cache_images=False, exclude_labeled="test_folds", labeled_manifest=str(folds_csv), test_folds=list(range(NUM_FOLDS))), seed=0
    )
    every_image = PretrainDataModule(PretrainDataConfig(sources=source, image_size=16, cache_images=False, exclude_labeled="all", labeled_manifest=str(folds_csv)), seed=0)
    kept = PretrainDataModule(PretrainDataConfig(sources=source, image_size=16, cache_images=False), seed=0)
    # With K-fold CV every labelled image is in some test fold: excluding all test folds = excluding all.
    assert pool_names(every_fold) == pool_names(every_image) == own
    assert pool_names(kept) == own | copies_of(table, list(range(NUM_FOLDS)))
