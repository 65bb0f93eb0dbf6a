"""The per-class manifold filter: a class-y sample is kept only inside the class-y real manifold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.eval.test_synthetic_metrics import PixelExtractor, _write_points
from tus.cli.synthetic import filter_main
from tus.data.images import DataError, UsageError
from tus.data.manifest import load_manifest
from tus.eval.filtering import filter_generated, per_class_membership
from tus.stages.synthetic import run_filter

# Two classes of real points, 2-d, far apart; k = 1: each ball's radius is 10 * sqrt(2) ~ 14.1.
REAL = {0: [(40, 50), (60, 50), (50, 40), (50, 60)], 1: [(190, 200), (210, 200), (200, 190), (200, 210)]}
# (point, conditioning label, kept?): in its own class's manifold; in the other class's one only; in none.
GENERATED = [((52, 50), 0, True), ((52, 50), 1, False), ((201, 200), 1, True), ((120, 120), 0, False)]


def test_per_class_membership_keeps_in_class_and_rejects_other_class_points():
    real = np.array([p for label in (0, 1) for p in REAL[label]], dtype=float)
    labels_real = np.array([label for label in (0, 1) for _ in REAL[label]])
    generated = np.array([g[0] for g in GENERATED], dtype=float)
    inside, ratios = per_class_membership(real, labels_real, generated, np.array([g[1] for g in GENERATED]), k=1)
    assert inside.tolist() == [g[2] for g in GENERATED]
    radius = 200**0.5  # distance to the nearest other point of the square
    # Brute force: the nearest own-class point divided by that radius.
    expected = [min(np.hypot(x - rx, y - ry) for rx, ry in REAL[label]) / radius for (x, y), label, _ in GENERATED]
    assert ratios.tolist() == pytest.approx(expected, rel=1e-5)
    assert expected[0] == pytest.approx(8 / radius) and expected[2] == pytest.approx(9 / radius)


@pytest.fixture
def labelled(tmp_path):
    real_paths = [p for label in (0, 1) for p in _write_points(tmp_path / "real", REAL[label], f"real{label}")]
    manifest = tmp_path / "real.csv"
    pd.DataFrame({"path": [f"real/{p.name}" for p in real_paths], "label": [0] * 4 + [1] * 4}).to_csv(manifest, index=False)
    generated = tmp_path / "generated"
    paths = [_write_points(generated, [point], f"gen{i}")[0] for i, (point, _, _) in enumerate(GENERATED)]
    pd.DataFrame({"index": range(len(paths)), "path": [p.name for p in paths], "label": [g[1] for g in GENERATED]}).to_csv(generated / "manifest.csv", index=False)
    return manifest, generated, paths


def test_filter_per_class_writes_labels_and_counts(labelled, tmp_path):
    manifest, generated, paths = labelled
    result = filter_generated(manifest, generated, tmp_path / "out", k=1, extractor=PixelExtractor(), per_class=True)
    assert result.table["decision"].tolist() == ["kept" if g[2] else "rejected" for g in GENERATED]
    kept = load_manifest(tmp_path / "out" / "manifest.csv", require_labels=True, require_patients=False)
    assert kept["sample_id"].tolist() == [paths[0].name, paths[2].name] and kept["label"].tolist() == [0, 1]
    report = run_filter(manifest, generated, tmp_path / "stage", k=1, extractor=PixelExtractor(), per_class=True)
    assert report["per_class"] == {"0": {"generated": 2, "kept": 1}, "1": {"generated": 2, "kept": 1}}
    # The class-blind filter keeps the other-class point: the per-class decision is what rejects it.
    blind = filter_generated(manifest, generated, tmp_path / "blind", k=1, extractor=PixelExtractor())
    assert blind.table["decision"].tolist()[:2] == ["kept", "kept"]


def test_per_class_needs_labels_and_enough_real_images(labelled, tmp_path):
    manifest, generated, _ = labelled
    with pytest.raises(UsageError, match="class 0: 4 real image"):
        filter_generated(manifest, generated, tmp_path / "a", k=4, extractor=PixelExtractor(), per_class=True)
    with pytest.raises(UsageError, match="labelled manifest, not a folder"):
        filter_generated(tmp_path / "real", generated, tmp_path / "b", k=1, extractor=PixelExtractor(), per_class=True)
    pd.DataFrame({"path": ["real/real0_000.png", "real/real0_001.png"]}).to_csv(tmp_path / "unlabelled.csv", index=False)
    with pytest.raises(DataError, match="unlabelled.csv: no 'label' column"):
        filter_main(["--real", str(tmp_path / "unlabelled.csv"), "--generated", str(generated), "--out", str(tmp_path / "c"), "--k", "1", "--per-class"])


def _fid_by_hand(real: np.ndarray, generated: np.ndarray) -> float:
    """Fréchet distance of two Gaussians fitted to the points (sample covariance, ddof 1), written out."""
    from scipy.linalg import sqrtm

    mu1, mu2 = real.mean(0), generated.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2))))


def test_metrics_per_class_score_each_class_against_its_own_real_images(labelled, tmp_path, capsys):
    from tus.stages.synthetic import format_metrics_report, run_metrics

    manifest, generated, _ = labelled
    metrics = run_metrics(manifest, generated, tmp_path / "metrics.json", extractor=PixelExtractor(), prc_k=1, per_class=True)
    assert set(metrics["per_class"]) == {"0", "1"}
    for label in (0, 1):
        scored = metrics["per_class"][str(label)]
        points = np.array([g[0] for g in GENERATED if g[1] == label], dtype=float)
        assert scored["num_real"] == 4 and scored["num_generated"] == 2
        assert scored["fid"] == pytest.approx(_fid_by_hand(np.array(REAL[label], dtype=float), points), rel=1e-4)
        # k = 1: one of the two class-y samples lies in a class-y ball (radius 10 sqrt 2); every class-y real
        # point lies within the two samples' mutual distance of one of them.
        assert scored["precision_mean"] == 0.5 and scored["recall_mean"] == 1.0
    # Against every real image, the other-class point (52, 50 | label 1) counts as precise: only per class it does not.
    assert metrics["precision_mean"] == 0.75
    assert json_loads(tmp_path / "metrics.json")["per_class"]["1"]["precision_mean"] == 0.5
    text = format_metrics_report(metrics)
    header = next(line for line in text.splitlines() if line.startswith("class "))
    assert header.split() == ["class", "real", "generated", "FID", "precision", "recall"]
    assert any(line.split()[:3] == ["1", "4", "2"] and "0.5000" in line for line in text.splitlines())
    with pytest.raises(UsageError, match="folder"):
        run_metrics(manifest, generated / "manifest.csv", extractor=PixelExtractor(), per_class=True)


def json_loads(path):
    import json

    return json.loads(path.read_text())
