import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from tus.data.images import content_hash, read_grayscale
from tus.data.phantom import generate_phantom, render_bmode, render_bmode_with_mask, sample_patient_traits

SMALL = {"num_patients": 30, "pool_size": 24, "image_size": 64}
LABELED_COLUMNS = ["path", "patient_id", "label", "class_name", "organ", "has_markers", "clean_label", "sample_id"]


def fingerprint(paths) -> dict:
    """Every file of a generated dataset, by content."""
    return {str(path.relative_to(paths.root)): content_hash(path) for path in sorted(paths.root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    return generate_phantom(tmp_path_factory.mktemp("phantom"), seed=3, **SMALL)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(small_phantom, tmp_path):
    again = generate_phantom(tmp_path / "again", seed=3, **SMALL)
    other = generate_phantom(tmp_path / "other", seed=4, **SMALL)
    reference = fingerprint(small_phantom)
    assert fingerprint(again) == reference
    different = fingerprint(other)
    shared_images = [name for name in reference if name.endswith(".png") and name in different]
    assert len(shared_images) > 20
    assert all(reference[name] != different[name] for name in shared_images)


def test_manifests_have_the_documented_columns_and_counts(small_phantom):
    labeled = pd.read_csv(small_phantom.labeled_manifest)
    pool = pd.read_csv(small_phantom.unlabeled_manifest)
    assert list(labeled.columns) == LABELED_COLUMNS
    assert list(pool.columns) == ["path", "patient_id", "organ", "sample_id"]
    assert labeled["patient_id"].nunique() == 30
    per_patient = labeled.groupby("patient_id").size()
    assert per_patient.between(2, 5).all()
    assert len(pool) == 24
    assert (labeled["sample_id"] == labeled["path"]).all() and labeled["sample_id"].is_unique
    assert pool["sample_id"].is_unique
    assert set(labeled["organ"]) == {"testicle"}
    assert set(labeled["has_markers"]) <= {0, 1}
    assert ((labeled["label"] == 1) == (labeled["class_name"] == "inhomogeneous")).all()
    for manifest, frame in ((small_phantom.labeled_manifest, labeled), (small_phantom.unlabeled_manifest, pool)):
        for path in frame["path"]:
            assert (manifest.parent / path).is_file()


def test_labels_are_per_patient_with_the_requested_positive_fraction(small_phantom):
    labeled = pd.read_csv(small_phantom.labeled_manifest)
    assert (labeled.groupby("patient_id")["label"].nunique() == 1).all()
    assert (labeled["label"] == labeled["clean_label"]).all()
    positive_patients = labeled.groupby("patient_id")["label"].first().sum()
    assert positive_patients == round(0.2 * 30)


def test_default_sized_phantom_matches_the_clinical_proportions(tmp_path):
    paths = generate_phantom(tmp_path / "default", num_patients=60, pool_size=40, image_size=32)
    labeled = pd.read_csv(paths.labeled_manifest)
    pool = pd.read_csv(paths.unlabeled_manifest)
    assert labeled.groupby("patient_id")["label"].first().mean() == pytest.approx(0.2)
    assert 0.1 <= labeled["label"].mean() <= 0.3
    assert 0.15 <= labeled["has_markers"].mean() <= 0.45
    assert set(pool["organ"]) == {"testicle", "thyroid"}
    assert 0.3 <= (pool["organ"] == "thyroid").mean() <= 0.7


def test_label_noise_flips_exactly_the_requested_count(small_phantom, tmp_path):
    clean = pd.read_csv(small_phantom.labeled_manifest)
    noisy_paths = generate_phantom(tmp_path / "noisy", seed=3, label_noise=0.1, **SMALL)
    noisy = pd.read_csv(noisy_paths.labeled_manifest)
    flipped = noisy["label"] != noisy["clean_label"]
    assert flipped.sum() == round(0.1 * len(noisy))
    assert (noisy["clean_label"] == clean["label"]).all()
    assert (noisy.loc[flipped, "label"] == 1 - noisy.loc[flipped, "clean_label"]).all()
    assert ((noisy["label"] == 1) == (noisy["class_name"] == "inhomogeneous")).all()
    # Only labels change: the images are the same pixels as without noise.
    for path in noisy["path"][:10]:
        assert content_hash(noisy_paths.root / "labeled" / path) == content_hash(small_phantom.root / "labeled" / path)


def test_images_are_2d_uint8_of_the_requested_size(small_phantom):
    for manifest in (small_phantom.labeled_manifest, small_phantom.unlabeled_manifest):
        for path in pd.read_csv(manifest)["path"][:8]:
            image = read_grayscale(manifest.parent / path)
            assert image.shape == (64, 64) and image.dtype == np.uint8
    image = render_bmode(np.random.default_rng(0), 96, "thyroid", True)
    assert image.shape == (96, 96) and image.dtype == np.uint8
    with pytest.raises(ValueError, match="organ"):
        render_bmode(np.random.default_rng(0), 64, "liver", False)


def organ_statistics(organ: str, inhomogeneous: bool, count: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Per image: mean organ gray level, and the spread of the locally averaged organ texture."""
    means, spreads = [], []
    for seed in range(count):
        image, mask = render_bmode_with_mask(np.random.default_rng([seed, inhomogeneous]), 128, organ, inhomogeneous)
        assert mask.sum() > 0.03 * mask.size
        # A 7x7 mean averages speckle out and keeps patches/striations; away from the
        # border it measures the organ's echotexture only.
        local_mean = ndimage.uniform_filter(image.astype(float), 7)
        interior = ndimage.binary_erosion(mask, iterations=4)
        means.append(image[mask].mean())
        spreads.append(local_mean[interior].std())
    return np.array(means), np.array(spreads)


@pytest.mark.parametrize("organ", ["testicle", "thyroid"])
def test_inhomogeneity_is_visible_in_texture_but_not_in_mean_brightness(organ):
    homogeneous_mean, homogeneous_spread = organ_statistics(organ, False)
    inhomogeneous_mean, inhomogeneous_spread = organ_statistics(organ, True)
    assert inhomogeneous_spread.mean() > 2.0 * homogeneous_spread.mean()
    assert np.median(inhomogeneous_spread) > homogeneous_spread.max()
    assert abs(inhomogeneous_mean.mean() - homogeneous_mean.mean()) < 5.0
    # Organ brightness varies between images more than between the class averages.
    assert homogeneous_mean.std() > 2.0


def test_field_of_view_is_black_outside_and_depth_is_partially_compensated():
    differences = []
    for seed in range(12):
        image, mask = render_bmode_with_mask(np.random.default_rng(seed), 128, "testicle", False)
        for corner in (image[:2, :2], image[:2, -2:]):
            assert (corner == 0).all()
        rows = np.nonzero(mask.any(axis=1))[0]
        top, bottom = rows[: len(rows) // 4], rows[-(len(rows) // 4) :]
        differences.append(image[top][mask[top]].mean() - image[bottom][mask[bottom]].mean())
    # Attenuation darkens deep organ tissue, but TGC leaves only a mild residual slope.
    assert 1.0 < np.mean(differences) < 25.0


def test_images_of_a_patient_share_organ_size_but_vary_in_detail():
    areas = []
    for patient in range(12):
        traits = sample_patient_traits(np.random.default_rng([patient, 99]))
        images, masks = zip(*(render_bmode_with_mask(np.random.default_rng([patient, view]), 96, "testicle", True, traits) for view in range(4)))
        areas.append([mask.sum() for mask in masks])
        assert all((images[0] != other).mean() > 0.5 for other in images[1:])
    areas = np.array(areas, dtype=float)
    within_patient = areas.std(axis=1).mean()
    between_patients = areas.mean(axis=1).std()
    assert within_patient < 0.6 * between_patients


def test_empty_pool_gives_an_empty_manifest_with_columns(tmp_path):
    paths = generate_phantom(tmp_path / "no_pool", num_patients=3, pool_size=0, image_size=32)
    pool = pd.read_csv(paths.unlabeled_manifest)
    assert len(pool) == 0 and list(pool.columns) == ["path", "patient_id", "organ", "sample_id"]
    assert pd.read_csv(paths.labeled_manifest)["patient_id"].nunique() == 3
