"""Manifest validation: every bad-input case names its row/file and `tus data check` exits 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tus.cli.main import main as tus_main
from tus.data.images import read_grayscale, write_grayscale
from tus.data.manifest import ManifestError, check_manifest, load_manifest, write_manifest


def rewrite(manifest: Path, edit) -> Path:
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    edit(frame)
    frame.to_csv(manifest, index=False)
    return manifest


def problems_of(manifest: Path, **kwargs) -> list[str]:
    _, problems = check_manifest(manifest, **kwargs)
    return [str(p) for p in problems]


def test_good_manifest_loads_with_derived_columns(labeled_manifest: Path):
    frame = load_manifest(labeled_manifest, num_folds=3)
    assert len(frame) == 24
    assert set(frame["label"]) == {0, 1}
    assert frame["sample_id"].tolist() == frame["path"].tolist()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in frame["abs_path"])
    assert frame["line"].tolist()[:2] == [2, 3]


def test_check_command_ok_prints_summary(labeled_manifest: Path, capsys):
    assert tus_main(["data", "check", str(labeled_manifest)]) == 0
    out = capsys.readouterr().out
    assert "images: 24" in out and "patients: 12" in out and "32x32 (24)" in out and "OK" in out


def test_missing_file_names_line_and_path(labeled_manifest: Path, capsys):
    (labeled_manifest.parent / "images/p003_1.png").unlink()
    assert tus_main(["data", "check", str(labeled_manifest)]) == 1
    out = capsys.readouterr().out
    assert "manifest.csv line 9 (images/p003_1.png): image file not found" in out


def test_corrupt_image_is_reported(labeled_manifest: Path):
    (labeled_manifest.parent / "images/p001_0.png").write_bytes(b"not a png at all")
    problems = problems_of(labeled_manifest)
    assert len(problems) == 1 and "line 4 (images/p001_0.png): unreadable or corrupt image" in problems[0]


def test_truncated_image_is_reported(labeled_manifest: Path):
    path = labeled_manifest.parent / "images/p002_0.png"
    path.write_bytes(path.read_bytes()[:60])
    assert any("p002_0.png" in p and "corrupt" in p for p in problems_of(labeled_manifest))


def test_label_out_of_range_and_missing(labeled_manifest: Path):
    def edit(frame):
        frame.loc[0, "label"] = "2"
        frame.loc[1, "label"] = "yes"
        frame.loc[2, "label"] = ""

    problems = problems_of(rewrite(labeled_manifest, edit))
    assert any("line 2" in p and "label '2' is not one of [0, 1]" in p for p in problems)
    assert any("line 3" in p and "label 'yes'" in p for p in problems)
    assert any("line 4" in p and "missing label" in p for p in problems)


def test_missing_columns(labeled_manifest: Path):
    problems = problems_of(rewrite(labeled_manifest, lambda f: f.drop(columns=["patient_id"], inplace=True)))
    assert problems == [f"{labeled_manifest}: missing required column 'patient_id' (found ['path', 'label', 'organ'])"]
    frame = pd.read_csv(labeled_manifest).rename(columns={"path": "file"})
    frame.to_csv(labeled_manifest, index=False)
    with pytest.raises(ManifestError, match="missing required column 'path'"):
        check_manifest(labeled_manifest)


def test_unlabeled_pool_needs_neither_labels_nor_patients(labeled_manifest: Path):
    rewrite(labeled_manifest, lambda f: f.drop(columns=["patient_id", "label"], inplace=True))
    frame, problems = check_manifest(labeled_manifest, require_labels=False)
    assert problems == []
    assert (frame["label"] == -1).all()
    assert frame["patient_id"].tolist() == frame["sample_id"].tolist()


def test_empty_patient_id(labeled_manifest: Path):
    problems = problems_of(rewrite(labeled_manifest, lambda f: f.__setitem__("patient_id", f["patient_id"].where(f.index != 5, " "))))
    assert any("line 7" in p and "empty patient_id" in p for p in problems)


def test_duplicate_image_across_patients(labeled_manifest: Path):
    images = labeled_manifest.parent / "images"
    shutil.copy(images / "p000_0.png", images / "p005_1.png")
    problems = problems_of(labeled_manifest)
    assert len(problems) == 1
    assert "images/p000_0.png, patient P000" in problems[0] and "images/p005_1.png, patient P005" in problems[0]


def test_duplicates_in_an_unlabeled_pool_are_not_a_leak(labeled_manifest: Path):
    images = labeled_manifest.parent / "images"
    shutil.copy(images / "p000_0.png", images / "p005_1.png")
    assert problems_of(labeled_manifest, require_labels=False) == []


def test_duplicate_within_a_patient_is_fine(labeled_manifest: Path):
    images = labeled_manifest.parent / "images"
    shutil.copy(images / "p000_0.png", images / "p000_1.png")
    assert problems_of(labeled_manifest) == []


def test_duplicate_sample_id(labeled_manifest: Path):
    problems = problems_of(rewrite(labeled_manifest, lambda f: f.__setitem__("sample_id", ["same"] * 2 + [f"s{i}" for i in range(22)])))
    assert problems == ["manifest.csv lines 2, 3: duplicate sample_id 'same'"]


def test_class_too_small_for_folds(labeled_manifest: Path):
    # 4 positive patients: fine for 3 folds, not for 5.
    assert problems_of(labeled_manifest, num_folds=3) == []
    problems = problems_of(labeled_manifest, num_folds=5)
    assert len(problems) == 1 and "class 1 has 4 patient(s), fewer than the 5 folds" in problems[0]


def test_reserved_column_rejected(labeled_manifest: Path):
    rewrite(labeled_manifest, lambda f: f.__setitem__("abs_path", "x"))
    with pytest.raises(ManifestError, match="reserved column"):
        check_manifest(labeled_manifest)


def test_rgb_and_16bit_images_read_as_single_channel(tmp_path: Path):
    rgb = np.zeros((8, 10, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    gray = read_grayscale(tmp_path / "rgb.png")
    assert gray.shape == (8, 10) and gray.dtype == np.uint8 and int(gray[0, 0]) == 76  # ITU-R 601 luma of pure red
    deep = np.arange(80, dtype=np.uint16).reshape(8, 10) * 500 + 1000
    Image.fromarray(deep).save(tmp_path / "deep.png")
    image = read_grayscale(tmp_path / "deep.png")
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255
    assert np.all(np.diff(image.ravel().astype(int)) >= 0)  # order preserved


def test_write_manifest_never_overwrites(labeled_manifest: Path, tmp_path: Path):
    frame = load_manifest(labeled_manifest)
    out = write_manifest(frame, tmp_path / "derived" / "manifest.csv")
    again = load_manifest(out)
    assert again["sample_id"].tolist() == frame["sample_id"].tolist()
    assert again["abs_path"].tolist() == frame["abs_path"].tolist()
    with pytest.raises(FileExistsError):
        write_manifest(frame, out)


def test_paths_may_be_absolute(labeled_manifest: Path, tmp_path: Path):
    frame = pd.read_csv(labeled_manifest)
    frame["path"] = [str(labeled_manifest.parent / p) for p in frame["path"]]
    elsewhere = tmp_path / "elsewhere" / "m.csv"
    elsewhere.parent.mkdir()
    frame.to_csv(elsewhere, index=False)
    assert problems_of(elsewhere) == []


def test_write_grayscale_roundtrip(tmp_path: Path):
    array = np.arange(64, dtype=np.uint8).reshape(8, 8)
    write_grayscale(tmp_path / "a" / "b.png", array)
    assert np.array_equal(read_grayscale(tmp_path / "a" / "b.png"), array)


def test_utf8_bom_manifest_reads_like_plain_utf8(labeled_manifest: Path, capsys):
    """Excel's "CSV UTF-8" writes a byte-order mark before the header: the manifest must read as
    if it were not there (same columns, same rows), through `tus data check` too."""
    bom = labeled_manifest.with_name("bom.csv")
    bom.write_bytes(b"\xef\xbb\xbf" + labeled_manifest.read_bytes())
    plain = load_manifest(labeled_manifest, num_folds=3)
    with_bom = load_manifest(bom, num_folds=3)
    assert list(with_bom.columns) == list(plain.columns)
    pd.testing.assert_frame_equal(with_bom.drop(columns=["abs_path"]), plain.drop(columns=["abs_path"]))
    assert tus_main(["data", "check", str(bom)]) == 0
    assert "\ufeff" not in capsys.readouterr().out
