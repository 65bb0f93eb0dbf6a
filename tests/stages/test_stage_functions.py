"""The stage functions behind ``tus metrics``, ``tus filter`` and ``tus explain``, called in-process with
keyword arguments as from a notebook: returned dicts, written files and option checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.callbacks.test_gradcam import tiny_classifier
from tests.eval.test_synthetic_metrics import (
    EXPECTED_INSIDE,
    REAL_POINTS,
    PixelExtractor,
    _write_points,
    planted,  # noqa: F401 - a fixture
)
from tus.data.images import OutputExistsError, UsageError, list_images, write_grayscale
from tus.methods.classifier import save_finetuned
from tus.stages.explain import run_explain
from tus.stages.synthetic import run_filter, run_metrics


def test_run_metrics_of_identical_sets_returns_and_writes_zero_fid_and_full_recall(tmp_path):
    # Pixel features of the same 4 points on both sides: FID 0, and every generated point inside the real
    # manifold and vice versa, so precision = recall = 1 (TesticulUS Sec. 4.2 protocol, k = 1).
    _write_points(tmp_path / "real", REAL_POINTS, "real")
    _write_points(tmp_path / "generated", REAL_POINTS, "gen")
    extractor = PixelExtractor()
    out = tmp_path / "metrics" / "synthetic.json"
    metrics = run_metrics(tmp_path / "real", tmp_path / "generated", out, extractor=extractor, prc_k=1)
    assert (metrics["num_real"], metrics["num_generated"]) == (4, 4)
    assert metrics["fid"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["precision_mean"] == 1.0 and metrics["recall_mean"] == 1.0
    assert metrics["inception_score_mean"] is None  # the pixel extractor has no logits
    assert extractor.images_embedded == 8  # no cache: each image embedded once
    assert json.loads(out.read_text()) == metrics


def test_run_metrics_checks_options_before_embedding(tmp_path):
    _write_points(tmp_path / "real", REAL_POINTS, "real")
    extractor = PixelExtractor()
    (tmp_path / "folder").mkdir()
    for options, message in (
        ({"batch_size": 0}, "--batch-size"),
        ({"prc_k": 0}, "--prc-k"),
        ({"weights": tmp_path / "w.pt"}, "--weights"),
        ({"image_size": 32}, "--image-size"),
        ({"real_size": "full"}, "--real-size 'full'"),
        ({"real_size": 0}, "--real-size 0"),
    ):
        with pytest.raises(UsageError, match=message):
            run_metrics(tmp_path / "real", tmp_path / "real", None, extractor=extractor, **options)
    with pytest.raises(UsageError, match="is a folder"):
        run_metrics(tmp_path / "real", tmp_path / "real", tmp_path / "folder", extractor=extractor)
    assert extractor.images_embedded == 0


def test_run_filter_keeps_the_planted_inside_images_and_sweeps(planted, tmp_path):  # noqa: F811 - the fixture
    manifest, generated_dir, generated_paths = planted
    out = tmp_path / "filtered"
    report = run_filter(manifest, generated_dir, out, k=1, organ="testis", sweep=[1, 2], link="copy", extractor=PixelExtractor())
    expected_kept = [p.name for p, keep in zip(generated_paths, EXPECTED_INSIDE) if keep]
    assert (report["k"], report["kept"], report["rejected"], report["num_generated"]) == (1, 4, 3, 7)
    assert report["out_dir"] == str(out) and report["link"] == "copy"
    assert [p.name for p in list_images(out / "images")] == expected_kept
    assert set(pd.read_csv(out / "manifest.csv")["organ"]) == {"testis"}
    assert json.loads((out / "filter.json").read_text()) == {k: v for k, v in report.items() if k not in ("out_dir", "sweep", "labeled_overlap")}
    assert [row["k"] for row in report["sweep"]["sweep"]] == [1, 2]
    assert report["sweep"]["sweep"][0]["kept"] == 4  # the sweep at k = 1 agrees with the filter
    assert json.loads((out / "sweep" / "sweep.json").read_text()) == report["sweep"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]  # the staging folder was renamed


def test_run_filter_without_sweep_and_its_option_checks(planted, tmp_path):  # noqa: F811 - the fixture
    manifest, generated_dir, _ = planted
    extractor = PixelExtractor()
    for options, error, message in (
        ({"k": 0}, UsageError, "k must be"),
        ({"k": 1, "sweep": []}, UsageError, "--sweep"),
        ({"k": 1, "sweep": [1, 9]}, UsageError, "--sweep"),
        ({"k": 1, "link": "symlink"}, UsageError, "--link"),
        ({"k": 1, "batch_size": 0}, UsageError, "--batch-size"),
    ):
        with pytest.raises(error, match=message):
            run_filter(manifest, generated_dir, tmp_path / "out", extractor=extractor, **options)
    assert extractor.images_embedded == 0 and not (tmp_path / "out").exists()
    report = run_filter(manifest, generated_dir, tmp_path / "out", k=1, extractor=extractor)
    assert report["sweep"] is None and report["kept"] == 4
    assert not (tmp_path / "out" / "sweep").exists()
    with pytest.raises(OutputExistsError):
        run_filter(manifest, generated_dir, tmp_path / "out", k=1, extractor=extractor)


def test_run_explain_returns_the_written_summary(tmp_path):
    save_finetuned(tiny_classifier(), tmp_path / "model")
    rng = np.random.default_rng(1)
    for index in range(3):
        write_grayscale(tmp_path / "images" / f"v{index}.png", rng.integers(0, 255, size=(40, 48), dtype=np.uint8))
    out = tmp_path / "explained"
    with pytest.raises(UsageError, match="--image-size"):  # no training config beside the model
        run_explain(tmp_path / "model.safetensors", tmp_path / "images", out)
    with pytest.raises(UsageError, match="--method"):
        run_explain(tmp_path / "model.safetensors", tmp_path / "images", out, method="gradcam", image_size=32)
    assert not out.exists()

    summary = run_explain(tmp_path / "model.safetensors", tmp_path / "images", out, image_size=32, rows_per_page=2, batch_size=2, seed=3)
    assert sorted(p.name for p in out.iterdir()) == ["marker_sensitivity.json", "overlays-000.png", "overlays-001.png", "per_image.csv"]
    assert json.loads((out / "marker_sensitivity.json").read_text()) == summary
    per_image = pd.read_csv(out / "per_image.csv")
    assert per_image["image"].tolist() == [str(tmp_path / "images" / f"v{i}.png") for i in range(3)]
    assert (summary["num_images"], summary["image_size"], summary["seed"], summary["method"]) == (3, 32, 3, "gradcam++")
    assert summary["prediction_change_rate"] == pytest.approx((per_image["predicted_clean"] != per_image["predicted_marked"]).mean())
    assert summary["mean_probability_shift"] == pytest.approx((per_image["probability_marked"] - per_image["probability_clean"]).abs().mean(), rel=1e-5)
    assert summary["checkpoint"] == str((tmp_path / "model.safetensors").resolve())
    with pytest.raises(OutputExistsError):  # never writes into a non-empty folder
        run_explain(tmp_path / "model.safetensors", tmp_path / "images", out, image_size=32)


def test_run_filter_reports_real_images_that_are_labelled_images(planted, tmp_path):  # noqa: F811 - the fixture
    """--labeled: the leakage check. Two of the real images are copies (one byte-identical, one
    re-encoded) of labelled images in folds 0 and 1; exactly they are reported, per fold."""
    from PIL import Image

    manifest, generated_dir, _ = planted
    real = pd.read_csv(manifest)
    real_paths = [str(manifest.parent / p) if not Path(p).is_absolute() else p for p in real["path"]]
    labeled_dir = tmp_path / "labeled"
    labeled_dir.mkdir()
    (labeled_dir / "same_bytes.png").write_bytes(Path(real_paths[0]).read_bytes())
    Image.open(real_paths[1]).save(labeled_dir / "reencoded.png", compress_level=0)  # same pixels, other bytes
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(labeled_dir / "unrelated.png")
    labeled = labeled_dir / "manifest.csv"
    pd.DataFrame({"path": ["same_bytes.png", "reencoded.png", "unrelated.png"], "patient_id": ["a", "b", "c"], "label": [0, 1, 0], "fold": [0, 1, 1]}).to_csv(labeled, index=False)
    before = labeled.read_bytes()
    report = run_filter(manifest, generated_dir, tmp_path / "out", k=1, extractor=PixelExtractor(), labeled=labeled)
    overlap = report["labeled_overlap"]
    assert overlap["labeled_in_pool"] == 2 and overlap["pool_images_shared"] == 2 and overlap["pool_images"] == len(real)
    assert {fold: (row["in_pool"], row["identical_files"], row["same_pixels"]) for fold, row in overlap["per_fold"].items()} == {0: (1, 1, 0), 1: (1, 0, 1)}
    assert json.loads((tmp_path / "out" / "labeled_overlap.json").read_text()) == {k: (v if k != "per_fold" else {str(f): r for f, r in v.items()}) for k, v in overlap.items()}
    assert labeled.read_bytes() == before
