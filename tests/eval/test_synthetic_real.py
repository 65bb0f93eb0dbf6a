"""FID and the manifold filter with the FID Inception on real ultrasound (BUSI breast, DDTI thyroid).

Subsets keep this CPU-sized: 120 BUSI images split in two halves of 60, and 60 DDTI images.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tus.eval.features import InceptionExtractor, InceptionWeightsNotFound
from tus.eval.filtering import filter_generated
from tus.eval.metrics import image_paths, metrics_from_features

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = [pytest.mark.shared_data, pytest.mark.slow]


def _spread(paths: list[Path], count: int) -> list[Path]:
    """``count`` paths evenly spaced over the sorted list (so every class is represented)."""
    return [paths[i] for i in np.linspace(0, len(paths) - 1, count).round().astype(int)]


@pytest.fixture(scope="module")
def real_sets(tmp_path_factory):
    if not (DATA / "busi" / "manifest.csv").is_file() or not (DATA / "ddti" / "manifest.csv").is_file():
        pytest.skip(f"shared data not found under {DATA}")
    try:
        extractor = InceptionExtractor()
    except InceptionWeightsNotFound as error:
        pytest.skip(str(error))
    busi = _spread(image_paths(DATA / "busi" / "manifest.csv"), 120)
    ddti = _spread(image_paths(DATA / "ddti" / "manifest.csv"), 60)
    cache = tmp_path_factory.mktemp("feature-cache")
    sets = {"busi_a": busi[0::2], "busi_b": busi[1::2], "ddti": ddti}
    features = {name: extractor.extract(paths, batch_size=16, cache_dir=cache) for name, paths in sets.items()}
    return extractor, cache, sets, features


def test_breast_vs_thyroid_fid_far_exceeds_breast_vs_breast(real_sets):
    _, _, _, features = real_sets
    within = metrics_from_features(features["busi_a"], features["busi_b"])
    across = metrics_from_features(features["busi_a"], features["ddti"])
    # Measured: about 290 across organs vs 127 within BUSI (60 vs 60 images inflate both).
    assert across["fid"] > 1.8 * within["fid"]
    # Measured: about 0.03 vs 0.9 (k = 3, one reference batch of all 60 real images).
    assert across["precision_mean"] < 0.2 < 0.7 < within["precision_mean"]


def test_filter_built_on_breast_rejects_most_thyroid_images(real_sets, tmp_path):
    extractor, cache, sets, _ = real_sets
    manifest = tmp_path / "busi_a.csv"
    pd.DataFrame({"path": [str(p) for p in sets["busi_a"]]}).to_csv(manifest, index=False)
    generated = tmp_path / "generated"
    generated.mkdir()
    for group in ("busi_b", "ddti"):
        for path in sets[group]:
            shutil.copy(path, generated / f"{group}_{path.name}")
    # k = 3 for 60 real images: the reference's k = 50 for ~880, scaled linearly.
    result = filter_generated(manifest, generated, tmp_path / "out", k=3, extractor=extractor, cache_dir=cache)
    kept = result.table.assign(group=[Path(p).name.split("_")[0] for p in result.table["path"]])
    kept_rate = kept.groupby("group")["decision"].apply(lambda d: float((d == "kept").mean()))
    # Measured: 3% of thyroid and 90% of held-out breast images kept.
    assert kept_rate["ddti"] <= 0.1
    assert kept_rate["busi"] >= 0.75
