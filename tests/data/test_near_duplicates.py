"""Near duplicates: every planted variant of a test-fold image is found and excluded from a pool,
and 1,000 distinct phantom images give no false match.

Independent checks: the whole-image hash equals ``imagehash.phash(hash_size=16)``; the distances
of the matrix product equal a brute-force XOR popcount of the packed words.
"""

from __future__ import annotations

from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tus.data.folds import assign_folds
from tus.data.images import read_grayscale, write_grayscale
from tus.data.manifest import load_manifest
from tus.data.near_duplicates import MAX_DISTANCE, PerceptualHashes, hash_images, near_duplicate_pairs, pair_distances
from tus.data.overlap import exclude_labeled, find_overlap
from tus.data.phantom import generate_phantom


def resized(image: np.ndarray, delta: int) -> np.ndarray:
    height, width = image.shape
    return np.asarray(Image.fromarray(image).resize((width + delta, height + delta), Image.Resampling.BILINEAR))


def cropped(image: np.ndarray, rng: np.random.Generator, keep: float = 0.95) -> np.ndarray:
    """Keep ``keep`` of the height and width, at a random offset."""
    height, width = image.shape
    h, w = round(keep * height), round(keep * width)
    y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    return image[y : y + h, x : x + w].copy()


def variants(image: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The issue's planted copies: JPEG q=90, resized by 1-2 px, brightened, 5% crop, horizontal flip
    (names ending in .jpg are written as JPEG files of quality 90, the others as PNG)."""
    return {
        "copy.jpg": image,
        "plus1px.png": resized(image, 1),
        "minus2px.png": resized(image, -2),
        "brighter.png": np.clip(image.astype(int) + int(rng.integers(2, 6)), 0, 255).astype(np.uint8),
        "crop5.png": cropped(image, rng),
        "flip.png": image[:, ::-1].copy(),
        "flip_crop.jpg": cropped(image[:, ::-1].copy(), rng),
    }


def test_whole_image_hash_is_imagehash_phash():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40 + 7 * i, 52), dtype=np.uint8) for i in range(3)]
    hashes = hash_images(images)
    for image, words in zip(images, hashes.whole):
        reference = imagehash.phash(Image.fromarray(image), hash_size=16).hash.flatten()
        mirrored = imagehash.phash(Image.fromarray(image[:, ::-1].copy()), hash_size=16).hash.flatten()
        assert np.array_equal(np.unpackbits(words[0].view(np.uint8)).astype(bool), reference)
        assert np.array_equal(np.unpackbits(words[1].view(np.uint8)).astype(bool), mirrored)


def brute_force_distance(a: PerceptualHashes, i: int, b: PerceptualHashes, j: int) -> int:
    def hamming(x, y) -> int:
        return int(sum(bin(int(p) ^ int(q)).count("1") for p, q in zip(x, y)))

    candidates = [hamming(w, b.whole[j, 0]) for w in a.whole[i]]
    candidates += [hamming(w, c) for w in a.whole[i] for c in b.crops[j]]
    candidates += [hamming(c, w) for c in a.crops[i] for w in b.whole[j]]
    return min(candidates)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    # 64 px images keep 1,000 of them fast; the hash works on a 64 px frame whatever the size.
    return generate_phantom(tmp_path_factory.mktemp("phantom"), num_patients=30, image_size=64, pool_size=1000, seed=5).root


def test_no_false_match_among_1000_distinct_phantom_images(phantom: Path):
    pool = pd.read_csv(phantom / "unlabeled" / "manifest.csv")
    assert len(pool) == 1000 and pool["patient_id"].nunique() > 200  # several images per patient, as generated
    images = [read_grayscale(phantom / "unlabeled" / p) for p in pool["path"]]
    hashes = hash_images(images)
    # One way suffices within one set: a's crops against b's image are b's image against a's crops.
    distances = pair_distances(hashes, hashes, one_way=True)
    distances = np.minimum(distances, distances.T)
    np.fill_diagonal(distances, 10**6)
    close = np.argwhere(distances <= MAX_DISTANCE)
    assert not len(close), f"false matches: {[(pool['path'][i], pool['path'][j], distances[i, j]) for i, j in close[:3]]}"
    assert distances.min() > MAX_DISTANCE + 4  # a margin, not a near miss (32 bits on this phantom)
    assert near_duplicate_pairs(hashes.subset(range(50)), hashes.subset(range(50)), same_set=True).empty
    rng = np.random.default_rng(0)
    for i, j in rng.integers(0, 1000, (4, 2)):
        assert pair_distances(hashes.subset([i]), hashes.subset([j]))[0, 0] == brute_force_distance(hashes, i, hashes, j)


def test_every_planted_variant_of_a_test_fold_image_is_found_and_excluded(phantom: Path, tmp_path: Path):
    labeled = load_manifest(phantom / "labeled" / "manifest.csv", num_folds=3)
    folds = assign_folds(labeled, 3, seed=0)
    rng = np.random.default_rng(1)
    rows, planted = [], {}
    own = pd.read_csv(phantom / "unlabeled" / "manifest.csv").head(200)  # distinct pool images
    for path in own["path"]:
        rows.append({"path": str(phantom / "unlabeled" / path), "organ": "testicle"})
    test_fold = 1
    for index in np.flatnonzero(folds == test_fold):
        image = read_grayscale(labeled["abs_path"].iloc[index])
        for kind, copy in variants(image, rng).items():
            name = f"{index}_{kind}"
            if name.endswith(".jpg"):
                Image.fromarray(copy).save(tmp_path / name, quality=90)
            else:
                write_grayscale(tmp_path / name, copy)
            written = read_grayscale(tmp_path / name)
            assert written.shape != image.shape or not np.array_equal(written, image)  # not an exact copy
            rows.append({"path": name, "organ": "testicle"})
            planted[str(tmp_path / name)] = labeled["sample_id"].iloc[index]
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    pool = load_manifest(tmp_path / "manifest.csv", require_labels=False, decode_images=False)

    overlap = find_overlap(pool, labeled, folds)
    found = overlap.groupby("pool_path")["labeled_sample_id"].agg(set).to_dict()
    missed = [p for p, source in planted.items() if source not in found.get(p, set())]
    assert not missed, f"{len(missed)} planted variants not found, e.g. {missed[:3]}"
    # Nothing else: no pool image of its own, and each variant only to its own source.
    assert set(found) == set(planted)
    assert all(found[p] == {planted[p]} for p in planted)
    assert set(overlap["match"]) <= {"near", "pixels"} and (overlap["fold"] == test_fold).all()

    kept, excluded = exclude_labeled(pool, overlap, "test_folds", [test_fold])
    assert set(excluded["pool_path"]) == set(planted)
    assert sorted(kept["abs_path"]) == sorted(str(phantom / "unlabeled" / p) for p in own["path"])
    kept, excluded = exclude_labeled(pool, overlap, "test_folds", [(test_fold + 1) % 3])
    assert len(kept) == len(pool) and excluded.empty


def test_images_too_small_to_hash_match_exactly_only():
    """A 1 x 3 image upsampled to the hash frame hashes like any other dark one: not compared."""
    dark, darker = np.array([[4, 0, 0]], dtype=np.uint8), np.array([[0, 0, 0]], dtype=np.uint8)
    texture = np.random.default_rng(0).integers(0, 250, (16, 16), dtype=np.uint8)
    hashes = hash_images([dark, darker, texture, texture + 3])
    assert hashes.hashable.tolist() == [False, False, True, True]
    pairs = near_duplicate_pairs(hashes, hashes, same_set=True)
    assert pairs[["a_row", "b_row"]].values.tolist() == [[2, 3]]


def test_repeated_comparisons_are_served_by_content_and_equal_a_fresh_one(monkeypatch):
    """A per-fold pool exclusion compares the same sets once per fold: the second comparison of
    equal hashes (other arrays, same content) is not computed again; other content is."""
    import tus.data.near_duplicates as near_duplicates

    rng = np.random.default_rng(3)
    textures = [rng.integers(0, 250, (40, 40), dtype=np.uint8) for _ in range(6)]
    pool = hash_images([*textures, np.fliplr(textures[0]), np.clip(textures[1].astype(int) + 5, 0, 255).astype(np.uint8)])
    labeled = hash_images(textures[:3])
    calls = []
    monkeypatch.setattr(near_duplicates, "pair_distances", lambda *args, **kwargs: calls.append(1) or pair_distances(*args, **kwargs))
    monkeypatch.setattr(near_duplicates, "_PAIRS", {})
    first = near_duplicate_pairs(pool, labeled)
    # The reference: the distance matrix itself, thresholded here.
    distances = pair_distances(pool, labeled)
    expected = [[a, b, distances[a, b]] for a, b in zip(*np.nonzero(distances <= MAX_DISTANCE))]
    assert first.values.tolist() == expected and len(first) >= 5  # the copies, the mirror, the brightened one
    first.loc[0, "distance"] = 99  # a caller's edit does not reach the kept result
    again = near_duplicate_pairs(PerceptualHashes(pool.whole.copy(), pool.crops.copy(), pool.hashable.copy()), labeled)
    assert len(calls) == 1 and again.values.tolist() == expected
    changed = PerceptualHashes(pool.whole.copy(), pool.crops.copy(), pool.hashable.copy())
    changed.whole[0] = ~changed.whole[0]
    changed.crops[0] = ~changed.crops[0]
    other = near_duplicate_pairs(changed, labeled)
    assert len(calls) == 2 and other.values.tolist() != expected
    assert near_duplicate_pairs(pool, labeled, same_set=False, max_distance=0).values.tolist() == [r for r in expected if r[2] == 0]
