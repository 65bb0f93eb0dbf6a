"""On-disk decoded-image cache (tus.data.cache): exact pixels, reuse, invalidation, locations."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tus.data.cache as cache_module
from tus.data.cache import (
    CACHE_DIR_ENV,
    DecodedImageCache,
    clear_memory_cache,
    default_cache_dir,
    resize_square,
)
from tus.data.images import ImageReadError, read_grayscale, write_grayscale


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test starts with an empty process memo and a cache root inside tmp_path."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "env-root"))
    clear_memory_cache()
    yield tmp_path / "env-root" / "images"
    clear_memory_cache()


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Images that exercise every decode path: down- and up-sizing, RGB, 16-bit, JPEG, BMP."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    paths = []
    for i, shape in enumerate([(40, 56), (24, 20), (32, 32), (64, 48)]):
        path = folder / f"gray{i}.png"
        write_grayscale(path, rng.integers(0, 256, size=shape, dtype=np.uint8))
        paths.append(path)
    rgb = folder / "rgb.png"
    Image.fromarray(rng.integers(0, 256, size=(30, 45, 3), dtype=np.uint8), mode="RGB").save(rgb)
    deep = folder / "deep.png"
    Image.fromarray(rng.integers(0, 4096, size=(36, 36), dtype=np.uint16)).save(deep)
    jpeg = folder / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, size=(50, 40), dtype=np.uint8), mode="L").save(jpeg, quality=80)
    bmp = folder / "plain.bmp"
    Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8), mode="L").save(bmp)
    return [*paths, rgb, deep, jpeg, bmp]


class DecodeCounter:
    """Counts calls to the cache module's decoder and hasher without changing their results."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.decodes = self.hashes = 0
        decode, digest = cache_module.read_grayscale, cache_module.content_hash

        def counting_decode(path):
            self.decodes += 1
            return decode(path)

        def counting_hash(path):
            self.hashes += 1
            return digest(path)

        monkeypatch.setattr(cache_module, "read_grayscale", counting_decode)
        monkeypatch.setattr(cache_module, "content_hash", counting_hash)


def direct(path: Path, size: int) -> np.ndarray:
    """What ManifestDataset computes for one image without any cache."""
    return resize_square(read_grayscale(path), size)


def test_cached_pixels_equal_direct_decoding(images: list[Path], tmp_path: Path) -> None:
    cache = DecodedImageCache(images, 32, tmp_path / "cache")
    assert cache.decoded == len(images) == len(cache)
    assert isinstance(cache.array, np.memmap) and not cache.array.flags.writeable
    assert cache.array.shape == (len(images), 32, 32) and cache.array.dtype == np.uint8
    for index, path in enumerate(images):
        expected = direct(path, 32)
        assert expected.shape == (32, 32)
        assert np.array_equal(cache.get(index), expected), path.name
        assert np.array_equal(cache[index], expected)
    image = cache.get(0)
    image[0, 0] ^= 1  # a copy: transforms may write to it without touching the cache
    assert image.flags.writeable and not np.array_equal(image, cache.array[0])
    assert cache.file.parent == tmp_path / "cache" and cache.file.suffix == ".npy"
    assert not list((tmp_path / "cache").glob("*.tmp"))  # the temporary file was renamed away


def test_second_cache_reuses_file_without_decoding_or_hashing(images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = DecodedImageCache(images, 32, tmp_path / "cache")
    written = first.file.stat().st_mtime_ns
    # Same process: the memo hands back the very same mapping (all folds x seeds share it).
    counter = DecodeCounter(monkeypatch)
    again = DecodedImageCache(images, 32, tmp_path / "cache")
    assert again.array is first.array and again.decoded == 0
    # A fresh process (memo cleared): the file and the content-hash index are read from disk.
    clear_memory_cache()
    second = DecodedImageCache(images, 32, tmp_path / "cache")
    assert second.key == first.key and second.decoded == 0
    assert (counter.decodes, counter.hashes) == (0, 0)
    assert second.file.stat().st_mtime_ns == written
    assert second.array is not first.array and np.array_equal(second.array, first.array)


def test_same_images_elsewhere_share_the_cache(images: list[Path], tmp_path: Path) -> None:
    first = DecodedImageCache(images, 32, tmp_path / "cache")
    copies = []
    for path in images:
        copy = tmp_path / "copy" / path.name
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(path.read_bytes())
        copies.append(copy)
    clear_memory_cache()
    assert DecodedImageCache(copies, 32, tmp_path / "cache").key == first.key
    # Row order is part of the key: the array rows follow the path order.
    assert DecodedImageCache(copies[::-1], 32, tmp_path / "cache").key != first.key


def test_changed_bytes_invalidate_even_with_same_size_and_mtime(images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = DecodedImageCache(images, 32, tmp_path / "cache")
    old_rows = np.array(first.array)
    changed = images.index(next(p for p in images if p.suffix == ".bmp"))
    path = images[changed]
    before = path.stat()
    time.sleep(0.05)  # past the file system's timestamp granularity, so ctime moves
    Image.fromarray(255 - read_grayscale(path), mode="L").save(path)  # BMP: same byte count
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # hide the edit from mtime
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)

    counter = DecodeCounter(monkeypatch)
    clear_memory_cache()  # as a later run would
    second = DecodedImageCache(images, 32, tmp_path / "cache")
    assert second.key != first.key and second.file != first.file and first.file.is_file()
    assert counter.hashes == 1  # only the changed file was rehashed
    assert second.decoded == len(images)
    assert np.array_equal(second.get(changed), direct(path, 32))
    assert not np.array_equal(second.get(changed), old_rows[changed])
    unchanged = [i for i in range(len(images)) if i != changed]
    assert np.array_equal(second.array[unchanged], old_rows[unchanged])


def test_two_sizes_side_by_side(images: list[Path], tmp_path: Path) -> None:
    small = DecodedImageCache(images, 16, tmp_path / "cache")
    large = DecodedImageCache(images, 32, tmp_path / "cache")
    assert small.key != large.key
    assert small.array.shape == (len(images), 16, 16) and large.array.shape == (len(images), 32, 32)
    for index, path in enumerate(images):
        assert np.array_equal(small.get(index), direct(path, 16))
        assert np.array_equal(large.get(index), direct(path, 32))
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.npy")) == sorted([small.file.name, large.file.name])


def test_cache_location_from_argument_env_and_xdg(images: list[Path], tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_cache_dir() == isolated_cache
    assert DecodedImageCache(images, 16).file.parent == isolated_cache
    assert DecodedImageCache(images, 16, tmp_path / "explicit").file.parent == tmp_path / "explicit"
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "tus" / "images"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "tus" / "images"


def test_subset_indexes_rows_of_the_full_cache(images: list[Path], tmp_path: Path) -> None:
    cache = DecodedImageCache(images, 16, tmp_path / "cache")
    rows = np.array([5, 0, 3])
    subset = cache.subset(rows)
    assert len(subset) == 3
    for position, row in enumerate(rows):
        assert np.array_equal(subset[position], direct(images[row], 16))
    with pytest.raises(IndexError):
        cache.subset([len(images)])


def test_pickling_sends_the_file_name_not_the_pixels(images: list[Path], tmp_path: Path) -> None:
    cache = DecodedImageCache(images, 32, tmp_path / "cache")
    payload = pickle.dumps(cache)
    assert len(payload) < cache.array.nbytes
    clear_memory_cache()
    restored = pickle.loads(payload)
    assert restored.decoded == len(images)  # state travels; no decode happens on unpickling
    assert np.array_equal(restored.array, cache.array)


def test_invalid_size_and_missing_file_are_rejected(images: list[Path], tmp_path: Path) -> None:
    for size in (None, 0, 2.5):
        with pytest.raises(ValueError, match="size"):
            DecodedImageCache(images, size, tmp_path / "cache")
    with pytest.raises(ImageReadError, match="gone.png: file not found"):
        DecodedImageCache([*images, tmp_path / "gone.png"], 16, tmp_path / "cache")


def _build_in_child(paths: list[Path], folder: Path, results) -> None:
    cache = DecodedImageCache(paths, 32, folder)
    results.put((cache.decoded, cache.key))


def test_concurrent_builds_decode_once(images: list[Path], tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=_build_in_child, args=(images, tmp_path / "cache", results)) for _ in range(2)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert sorted(decoded for decoded, _ in outcomes) == [0, len(images)]
    assert len({key for _, key in outcomes}) == 1
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert np.array_equal(DecodedImageCache(images, 32, tmp_path / "cache").array, np.stack([direct(p, 32) for p in images]))


def test_touched_but_unchanged_file_is_rehashed_and_reuses_the_cache(images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = DecodedImageCache(images, 32, tmp_path / "cache")
    os.utime(images[0], ns=(0, 10**18))  # new mtime, same bytes
    counter = DecodeCounter(monkeypatch)
    clear_memory_cache()
    second = DecodedImageCache(images, 32, tmp_path / "cache")
    assert (counter.hashes, counter.decodes, second.decoded) == (1, 0, 0)
    assert second.key == first.key
