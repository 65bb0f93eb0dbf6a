"""Leakage guard: planted duplicates (byte-identical, re-encoded) are found per fold and excluded exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tus.cli.data import main as data_main
from tus.data.datamodules import ImageSourceConfig
from tus.data.images import content_hash, write_grayscale
from tus.data.manifest import load_manifest
from tus.data.overlap import exclude_labeled, find_overlap, labeled_folds, overlap_report
from tus.data.pools import DiffusionDataConfig, DiffusionDataModule, PretrainDataConfig, PretrainDataModule


def planted(root: Path) -> tuple[Path, Path]:
    """6 labelled images in 3 folds; a pool of 5 own images plus 3 planted copies of labelled ones:
    lab0 (fold 0) byte-identical, lab3 (fold 1) re-saved as PNG at another compression level and
    lab4 (fold 2) as BMP."""
    rng = np.random.default_rng(0)
    labeled = []
    for i in range(6):
        write_grayscale(root / "labeled" / f"lab{i}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
        labeled.append({"path": f"lab{i}.png", "patient_id": f"P{i}", "label": i % 2, "fold": i // 2})
    pd.DataFrame(labeled).to_csv(root / "labeled" / "manifest.csv", index=False)
    pool = root / "pool"
    for i in range(5):
        write_grayscale(pool / f"own{i}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
    shutil.copy(root / "labeled" / "lab0.png", pool / "copy_lab0.png")
    with Image.open(root / "labeled" / "lab3.png") as image:
        image.save(pool / "recoded_lab3.png", compress_level=0)
    with Image.open(root / "labeled" / "lab4.png") as image:
        image.save(pool / "recoded_lab4.bmp")
    names = sorted(p.name for p in pool.iterdir())
    pd.DataFrame({"path": names, "organ": "testis"}).to_csv(pool / "manifest.csv", index=False)
    return pool / "manifest.csv", root / "labeled" / "manifest.csv"


def test_planted_duplicates_are_found_per_fold(tmp_path):
    pool_path, labeled_path = planted(tmp_path)
    pool, labeled = load_manifest(pool_path, require_labels=False), load_manifest(labeled_path)
    assert content_hash(tmp_path / "pool" / "recoded_lab3.png") != content_hash(tmp_path / "labeled" / "lab3.png")
    folds = labeled_folds(labeled)
    overlap = find_overlap(pool, labeled, folds)
    found = {Path(p).name: (Path(q).name, f, m) for p, q, f, m in overlap[["pool_path", "labeled_path", "fold", "match"]].values}
    assert found == {"copy_lab0.png": ("lab0.png", 0, "file"), "recoded_lab3.png": ("lab3.png", 1, "pixels"), "recoded_lab4.bmp": ("lab4.png", 2, "pixels")}
    report = overlap_report(overlap, folds, len(pool))
    assert report["per_fold"] == {
        0: {"labeled_images": 2, "in_pool": 1, "pool_images": 1, "identical_files": 1, "same_pixels": 0, "near_duplicates": 0, "same_patient": 0},
        1: {"labeled_images": 2, "in_pool": 1, "pool_images": 1, "identical_files": 0, "same_pixels": 1, "near_duplicates": 0, "same_patient": 0},
        2: {"labeled_images": 2, "in_pool": 1, "pool_images": 1, "identical_files": 0, "same_pixels": 1, "near_duplicates": 0, "same_patient": 0},
    }
    assert (report["labeled_in_pool"], report["pool_images_shared"], report["pool_images"]) == (3, 3, 8)

    kept, excluded = exclude_labeled(pool, overlap, "test_folds", [1, 2])
    assert sorted(Path(p).name for p in excluded["pool_path"]) == ["recoded_lab3.png", "recoded_lab4.bmp"]
    assert sorted(Path(p).name for p in kept["abs_path"]) == ["copy_lab0.png", *(f"own{i}.png" for i in range(5))]
    kept, _ = exclude_labeled(pool, overlap, "all")
    assert sorted(Path(p).name for p in kept["abs_path"]) == [f"own{i}.png" for i in range(5)]
    kept, excluded = exclude_labeled(pool, overlap, "none")
    assert len(kept) == 8 and excluded.empty


def test_overlap_command_prints_one_line_per_fold_and_a_total(tmp_path, capsys):
    pool_path, labeled_path = planted(tmp_path)
    assert data_main(["overlap", str(pool_path), str(labeled_path), "--list", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "fold 0: 1 of 2 labelled images in the pool (1 pool images; 1 identical files, 0 re-encoded, 0 near duplicates, 0 of the fold's patients)",
        "fold 1: 1 of 2 labelled images in the pool (1 pool images; 0 identical files, 1 re-encoded, 0 near duplicates, 0 of the fold's patients)",
        "fold 2: 1 of 2 labelled images in the pool (1 pool images; 0 identical files, 1 re-encoded, 0 near duplicates, 0 of the fold's patients)",
        "total: 3 of 6 labelled images in the pool; 3 of 8 pool images are labelled images, their near duplicates or their patients' images",
    ]


def test_pools_drop_exactly_the_labelled_images_and_record_them(tmp_path):
    pool_path, labeled_path = planted(tmp_path)
    options = {"exclude_labeled": "test_folds", "labeled_manifest": str(labeled_path), "test_folds": [0, 1]}
    pretrain = PretrainDataModule(PretrainDataConfig(sources=[ImageSourceConfig(manifest=str(pool_path))], image_size=16, cache_images=False, **options), seed=0)
    names = sorted(Path(p).name for p in pretrain.prepare_frames()[0]["abs_path"])
    assert names == [*(f"own{i}.png" for i in range(5)), "recoded_lab4.bmp"]
    record = pretrain.pool_report()["excluded_labeled"]
    assert json.loads(json.dumps(record)) == json.loads(json.dumps(record, default=str))  # pool.json-ready
    assert record["excluded_images"] == 2 and record["test_folds"] == [0, 1]
    assert sorted(Path(r["pool_path"]).name for r in record["excluded"]) == ["copy_lab0.png", "recoded_lab3.png"]
    assert record["overlap_per_source"][str(pool_path)]["labeled_in_pool"] == 3

    diffusion = DiffusionDataModule(
        DiffusionDataConfig(sources=[ImageSourceConfig(manifest=str(pool_path))], image_size=16, cache_images=False, exclude_labeled="all", labeled_manifest=str(labeled_path)), seed=0
    )
    assert sorted(Path(p).name for p in diffusion.prepare_frames()[0]["abs_path"]) == [f"own{i}.png" for i in range(5)]
    assert diffusion.pool_report()["excluded_labeled"]["excluded_images"] == 3

    reference = PretrainDataModule(PretrainDataConfig(sources=[ImageSourceConfig(manifest=str(pool_path))], image_size=16, cache_images=False), seed=0)
    assert len(reference.prepare_frames()[0]) == 8 and reference.pool_report()["excluded_labeled"] == {"exclude_labeled": "none"}
    with pytest.raises(ValueError, match="test_folds needs test_folds"):
        PretrainDataModule(PretrainDataConfig(sources=[ImageSourceConfig(manifest=str(pool_path))], exclude_labeled="test_folds", labeled_manifest=str(labeled_path)), seed=0)


def test_a_test_patients_other_images_and_their_near_duplicates_leave_the_pool(tmp_path):
    """A pool with the labelled set's patient ids: every pool image of a test-fold patient leaves,
    and so does a JPEG copy of such an image that carries no patient id; other folds' patients stay
    unless they are tested on too."""
    rng = np.random.default_rng(3)
    smooth = lambda: np.kron(rng.integers(0, 255, (8, 8)), np.ones((6, 6))).astype(np.uint8)  # noqa: E731
    labeled = []
    for i in range(4):
        write_grayscale(tmp_path / "labeled" / f"lab{i}.png", smooth())
        labeled.append({"path": f"lab{i}.png", "patient_id": f"P{i}", "label": i % 2, "fold": i % 2})
    pd.DataFrame(labeled).to_csv(tmp_path / "labeled" / "manifest.csv", index=False)
    pool = tmp_path / "pool"
    frames = {"p0_frame.png": "P0", "p1_frame.png": "P1", "own.png": "U7", "anonymous.png": ""}
    for name in frames:
        write_grayscale(pool / name, smooth())
    Image.open(pool / "p0_frame.png").save(pool / "p0_frame_copy.jpg", quality=90)
    frames["p0_frame_copy.jpg"] = ""
    pd.DataFrame({"path": list(frames), "patient_id": list(frames.values()), "organ": "testis"}).to_csv(pool / "manifest.csv", index=False)
    pool_frame = load_manifest(pool / "manifest.csv", require_labels=False)
    labeled_frame = load_manifest(tmp_path / "labeled" / "manifest.csv")
    overlap = find_overlap(pool_frame, labeled_frame, labeled_folds(labeled_frame))
    found = {Path(p).name: (m, patient, fold) for p, m, patient, fold in overlap[["pool_path", "match", "labeled_patient_id", "fold"]].values}
    assert found == {"p0_frame.png": ("patient", "P0", 0), "p0_frame_copy.jpg": ("near_patient", "P0", 0), "p1_frame.png": ("patient", "P1", 1)}
    kept, _ = exclude_labeled(pool_frame, overlap, "test_folds", [0])
    assert sorted(Path(p).name for p in kept["abs_path"]) == ["anonymous.png", "own.png", "p1_frame.png"]
    assert overlap_report(overlap, labeled_folds(labeled_frame), len(pool_frame))["per_fold"][0]["same_patient"] == 2


def test_image_hashes_are_kept_per_file_version(tmp_path):
    """The in-memory hashes follow the file: the same values as hashing the bytes and pixels by
    hand, and a rewritten file (new size or modification time) is hashed again."""
    import hashlib
    import os

    from tus.data.overlap import image_hashes

    def by_hand(path: Path) -> tuple[str, str]:
        pixels = np.asarray(Image.open(path).convert("L"))
        digest = hashlib.sha1(np.asarray(pixels.shape, dtype=np.int64).tobytes())
        digest.update(pixels.tobytes())
        return hashlib.sha1(path.read_bytes()).hexdigest(), digest.hexdigest()

    path, copy = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(path)
    shutil.copy(path, copy)
    first = image_hashes([str(path), str(copy)])
    assert [tuple(row) for row in first[["file_hash", "pixel_hash"]].to_numpy()] == [by_hand(path), by_hand(copy)]
    Image.fromarray(np.full((64, 48), 7, dtype=np.uint8)).save(path)
    os.utime(path, ns=(1, 1))  # even with an old timestamp: the size changed
    again = image_hashes([str(path), str(copy)])
    assert tuple(again.iloc[0]) == by_hand(path) != tuple(first.iloc[0])
    assert tuple(again.iloc[1]) == tuple(first.iloc[1])
