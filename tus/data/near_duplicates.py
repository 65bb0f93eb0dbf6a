"""Near-duplicate images: a perceptual hash that survives re-encoding, resizing, brightening,
small crops and mirroring, compared by Hamming distance.

A byte or pixel hash (:mod:`tus.data.overlap`) misses a JPEG re-encode, a copy resized by one
pixel or brightened by one grey level. Here each image gets the DCT hash of ``imagehash.phash``
with ``hash_size=16`` (the grey image resized to 64 x 64 with a Lanczos filter, its 16 x 16
lowest 2-D DCT-II coefficients compared with their median: 256 bits), computed for

- the image and its mirror (horizontal flip), and
- crop windows that each cover a fraction of the image's width and height (``crop_fractions``:
  95%, 97%, 98.5%), at every offset on a half-pixel grid of the 64-pixel frame: the image
  resized to ``2 * round(64 / fraction)`` pixels, cut into 128-pixel windows at each whole
  pixel, each window averaged 2 x 2 down to 64 pixels before the DCT (49 + 25 + 9 windows).

Two images are near duplicates when some pair of (image or mirror, crop window) hashes lies
within ``max_distance`` bits: a copy cropped by 5% of each side lands within half a pixel of
one of the other image's windows (and, the other way round, an image may be a crop of the pool
image). Why 256 bits and a window grid: ultrasound images share their layout (field of view,
dark background), so a 64-bit hash puts distinct phantom images 2 bits apart; 256 bits keep
distinct images apart, but at these frequencies a one-pixel misalignment changes many bits, so a
crop must be matched by a window that is aligned to within half a pixel.

Measured on generated phantom images (``tus.data.phantom``, 1,000 images of 128 px with 300
planted copies; ``tests/data/test_near_duplicates.py`` repeats it at 64 px): distinct images
are >= 32 bits apart (images of one patient included; 38-40 on most seeds); JPEG q=90,
resizing by 1-2 px, brightening by a few grey levels and mirroring stay <= 6 bits, crops that
keep 95% of each side <= 14 bits, crops keeping 95-99% <= 20 bits. ``max_distance`` = 24 sits
between. Crops that keep much less (90%) or change the aspect ratio (one side only) are out
of reach of this hash.

Cost (2-core AMD EPYC, CPU time): about 3 ms to hash an image (85 hashes) and about 8 s per
million image pairs compared (one matrix product of +-1 vectors per chunk): a 20,000-image
pool against 1,000 labelled images takes a few minutes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tus.data.images import read_grayscale

HASH_SIZE = 16
# imagehash.phash's frame: hash_size x highfreq_factor (4) pixels.
FRAME = 4 * HASH_SIZE
CROP_FRACTIONS = (0.95, 0.97, 0.985)
MAX_DISTANCE = 24
# Smaller images hold too little detail for a perceptual hash (a 3-pixel image, upsampled to the
# 64-pixel frame, hashes like any other dark one): they are matched by their exact hashes only.
MIN_SIDE = 16
# The distance reported for pairs with such an image: never a near duplicate.
UNHASHABLE = 10**6
WORDS = HASH_SIZE * HASH_SIZE // 64


@dataclass(frozen=True)
class NearDuplicateConfig:
    """``max_distance``: bits (of 256) within which two hashes match; ``crop_fraction``: the side
    fraction of the crop windows (a copy cropped to about this fraction is still found)."""

    max_distance: int = MAX_DISTANCE
    crop_fractions: tuple[float, ...] = CROP_FRACTIONS

    def __post_init__(self) -> None:
        if not 0 <= self.max_distance < HASH_SIZE * HASH_SIZE // 2:
            raise ValueError(f"near-duplicate max_distance must be in 0..{HASH_SIZE * HASH_SIZE // 2 - 1} bits, got {self.max_distance}")
        if not self.crop_fractions or not all(0.8 <= f < 1.0 for f in self.crop_fractions):
            raise ValueError(f"near-duplicate crop_fractions must lie in [0.8, 1), got {self.crop_fractions}")


@dataclass
class PerceptualHashes:
    """Hashes of N images as packed 256-bit words: ``whole`` (N, 2, 4) for the image and its mirror,
    ``crops`` (N, K, 4) for its crop windows; ``hashable`` (N,) False for images under ``MIN_SIDE``."""

    whole: np.ndarray
    crops: np.ndarray
    hashable: np.ndarray

    def __len__(self) -> int:
        return len(self.whole)

    def subset(self, rows: np.ndarray | list[int] | range) -> PerceptualHashes:
        rows = np.asarray(rows, dtype=int)
        return PerceptualHashes(self.whole[rows], self.crops[rows], self.hashable[rows])


def _dct_matrix(size: int) -> np.ndarray:
    """The first HASH_SIZE rows of the (unscaled) DCT-II matrix: ``C[k, n] = cos(pi k (2n + 1) / 2N)``."""
    n = np.arange(size)
    return np.cos(np.pi * np.arange(HASH_SIZE)[:, None] * (2 * n[None, :] + 1) / (2 * size))


DCT = _dct_matrix(FRAME)
# DCT of a 2x2-averaged 128-pixel window: C @ D with D[i, 2i] = D[i, 2i + 1] = 1/2.
DCT_OF_HALVED = np.repeat(DCT, 2, axis=1) / 2


def _bits(coefficients: np.ndarray) -> np.ndarray:
    """(..., 16, 16) DCT coefficients -> (..., 4) uint64 words: each coefficient above the median."""
    flat = coefficients.reshape(*coefficients.shape[:-2], -1)
    bits = flat > np.median(flat, axis=-1, keepdims=True)
    return np.packbits(bits, axis=-1).view(np.uint64)


def hash_image(image: np.ndarray, config: NearDuplicateConfig = NearDuplicateConfig()) -> tuple[np.ndarray, np.ndarray]:
    """(whole (2, 4), crops (K, 4)) hashes of one (H, W) uint8 grey image."""
    picture = Image.fromarray(np.ascontiguousarray(image))
    frame = np.asarray(picture.resize((FRAME, FRAME), Image.Resampling.LANCZOS), dtype=np.float64)
    whole = DCT @ np.stack([frame, frame[:, ::-1]]) @ DCT.T
    windows = []
    for fraction in config.crop_fractions:
        side = 2 * round(FRAME / fraction)
        big = np.asarray(picture.resize((side, side), Image.Resampling.LANCZOS), dtype=np.float64)
        offsets = side - 2 * FRAME + 1
        rows = np.stack([DCT_OF_HALVED @ big[y : y + 2 * FRAME] for y in range(offsets)])  # (offsets, 16, side)
        windows.append(np.stack([rows[:, :, x : x + 2 * FRAME] @ DCT_OF_HALVED.T for x in range(offsets)], axis=1).reshape(-1, HASH_SIZE, HASH_SIZE))
    return _bits(whole), _bits(np.concatenate(windows))


def hash_images(images: Iterable[np.ndarray], config: NearDuplicateConfig = NearDuplicateConfig()) -> PerceptualHashes:
    """Hashes of (H, W) uint8 grey images."""
    pairs, hashable = [], []
    for image in images:
        pairs.append(hash_image(image, config))
        hashable.append(min(image.shape[:2]) >= MIN_SIDE)
    return _stacked(pairs, hashable, config)


def _stacked(pairs: list[tuple[np.ndarray, np.ndarray]], hashable: list[bool], config: NearDuplicateConfig) -> PerceptualHashes:
    if not pairs:
        return PerceptualHashes(np.zeros((0, 2, WORDS), np.uint64), np.zeros((0, crop_windows(config.crop_fractions), WORDS), np.uint64), np.zeros(0, dtype=bool))
    return PerceptualHashes(np.stack([w for w, _ in pairs]), np.stack([c for _, c in pairs]), np.asarray(hashable, dtype=bool))


def hash_files(paths: Iterable[str | Path], config: NearDuplicateConfig = NearDuplicateConfig()) -> PerceptualHashes:
    """Hashes of image files, read as 8-bit grey (:func:`tus.data.images.read_grayscale`).

    Kept in memory per (file, size, modification time, crop fractions): a study checks its pools
    for the warning and again for each fold's exclusion, and each file is hashed once."""
    pairs, hashable = [], []
    for path in paths:
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, config.crop_fractions)
        if key not in _FILE_HASHES:
            image = read_grayscale(path)
            _FILE_HASHES[key] = (*hash_image(image, config), min(image.shape[:2]) >= MIN_SIDE)
        whole, crops, ok = _FILE_HASHES[key]
        pairs.append((whole, crops))
        hashable.append(ok)
    return _stacked(pairs, hashable, config)


_FILE_HASHES: dict[tuple, tuple[np.ndarray, np.ndarray, bool]] = {}


def _signs(words: np.ndarray) -> np.ndarray:
    """(..., 4) uint64 words -> (..., 256) float32 of +1/-1, so that a dot product is 256 - 2 * Hamming."""
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1)
    return bits.astype(np.float32) * 2 - 1


def pair_distances(a: PerceptualHashes, b: PerceptualHashes, chunk_floats: int = 16_000_000, *, one_way: bool = False) -> np.ndarray:
    """(len(a), len(b)) near-duplicate distance: the smallest Hamming distance between a's image or
    mirror and b's image, between a's image or mirror and a crop window of b, and between a crop
    window of a and b's image or mirror (:data:`UNHASHABLE` for images under :data:`MIN_SIDE`
    pixels). ``one_way`` leaves out the last (for a set against itself,
    where it is the transpose's second).

    Hamming distances come from one matrix product of +-1 vectors (exact in float32)."""
    bits = HASH_SIZE * HASH_SIZE
    distances = np.empty((len(a), len(b)), dtype=np.int32)
    if not len(a) or not len(b):
        return distances
    m, kb, ka = len(b), b.crops.shape[1], a.crops.shape[1]
    b_image = _signs(b.whole[:, 0])  # (m, 256)
    b_whole = _signs(b.whole).reshape(m * 2, bits)
    b_crops = _signs(b.crops).reshape(m * kb, bits)
    step = max(1, chunk_floats // (m * max(2 * kb, 2 * ka)))
    for start in range(0, len(a), step):
        a_whole = _signs(a.whole[start : start + step])
        a_crops = _signs(a.crops[start : start + step])
        c = len(a_whole)
        best = (a_whole.reshape(c * 2, bits) @ b_image.T).reshape(c, 2, m).max(axis=1)
        best = np.maximum(best, (a_whole.reshape(c * 2, bits) @ b_crops.T).reshape(c, 2, m, kb).max(axis=(1, 3)))
        if not one_way:
            best = np.maximum(best, (a_crops.reshape(c * ka, bits) @ b_whole.T).reshape(c, ka, m, 2).max(axis=(1, 3)))
        distances[start : start + c] = np.rint((bits - best) / 2).astype(np.int32)
    distances[~a.hashable] = UNHASHABLE
    distances[:, ~b.hashable] = UNHASHABLE
    return distances


def near_duplicate_pairs(a: PerceptualHashes, b: PerceptualHashes, max_distance: int = MAX_DISTANCE, *, same_set: bool = False) -> pd.DataFrame:
    """Pairs (``a_row``, ``b_row``, ``distance``) within ``max_distance`` bits, sorted by rows.
    ``same_set``: a and b are one set; an image is not paired with itself and each pair is listed once.

    The last few results are kept in memory by the hashes' content: a per-fold pool exclusion
    compares the same pool with the same labelled set once per fold (only which rows leave the
    pool differs), ~5 s a comparison for BUSI + DDTI against BUSI on a 2-core CPU."""
    key = (_content_key(a), _content_key(b), max_distance, same_set)
    if key not in _PAIRS:
        distances = pair_distances(a, b, one_way=same_set)
        if same_set:
            distances = np.minimum(distances, distances.T)  # the crop comparisons are not symmetric
            distances[np.tril_indices(len(a))] = UNHASHABLE
        a_rows, b_rows = np.nonzero(distances <= max_distance)
        _PAIRS[key] = pd.DataFrame({"a_row": a_rows, "b_row": b_rows, "distance": distances[a_rows, b_rows]})
        while len(_PAIRS) > _PAIRS_KEPT:
            _PAIRS.pop(next(iter(_PAIRS)))
    return _PAIRS[key].copy()


def _content_key(hashes: PerceptualHashes) -> str:
    digest = hashlib.sha1()
    for array in (hashes.whole, hashes.crops, hashes.hashable):
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


_PAIRS: dict[tuple, pd.DataFrame] = {}  # (a's content, b's content, max_distance, same_set) -> pairs, oldest first
_PAIRS_KEPT = 8


def crop_windows(crop_fractions: tuple[float, ...] = CROP_FRACTIONS) -> int:
    """How many crop windows each image gets (per fraction, the square of its offsets on the half-pixel grid)."""
    return sum((2 * round(FRAME / f) - 2 * FRAME + 1) ** 2 for f in crop_fractions)


__all__ = [
    "CROP_FRACTIONS",
    "MAX_DISTANCE",
    "MIN_SIDE",
    "NearDuplicateConfig",
    "PerceptualHashes",
    "crop_windows",
    "hash_files",
    "hash_image",
    "hash_images",
    "near_duplicate_pairs",
    "pair_distances",
]
