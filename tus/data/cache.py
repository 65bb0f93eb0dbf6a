"""Decoded, resized images cached on disk across runs and in memory across folds.

A cross-validation run trains K folds x S seeds on the same images; decoding and resizing
every PNG again for each of them (and again for every rerun) costs more than training a
small model on a many-core machine. :class:`DecodedImageCache` decodes a list of images
once, with exactly the dataset's decode (:func:`tus.data.images.read_grayscale`) and resize
(:func:`resize_square`), into one ``(N, size, size)`` uint8 ``.npy`` file,
then memory-maps it: 25k+ images are never all held in RAM, and forked DataLoader workers
share the page cache.

The file is named by a hash of the files' contents (SHA-1, in row order), the size, the
decode/resize method and :data:`FORMAT_VERSION`: editing an image or upgrading the decoder
gives a new file, while the same images elsewhere on disk reuse the old one. Hashing every
file on every run would itself cost a pass over the data, so content hashes are remembered
in an index keyed by (path, size, mtime, ctime, inode); any write to a file changes its
ctime, so a changed file is always rehashed.

Writes go to a temporary file that is ``os.replace``-d into place, under a file lock so two
processes building the same cache do the work once; a reader never sees a partial file.

Within a process, :func:`cached_images` remembers which cache row holds each decoded file
(per cache folder and size), so datasets over any subset of already-decoded images (the
folds x seeds of a CV, a pretraining pool's held-out probe slice) reuse the rows instead of
building a new array: no image is decoded twice in one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import PIL
from filelock import FileLock

from tus.data.images import ImageReadError, content_hash, read_grayscale, split_frame

# Bump when the file layout or the decode/resize code changes in a way the versions below miss.
FORMAT_VERSION = 1
# Decoded pixels depend on the decoder (Pillow, for JPEG) and the resize (OpenCV) versions.
RESIZE_METHOD = f"read_grayscale+resize_square(area-down,linear-up)/pillow-{PIL.__version__}/opencv-{cv2.__version__}"
CACHE_DIR_ENV = "TUS_CACHE_DIR"
HASH_INDEX_NAME = "file-hashes.json"

# Per process: (cache folder, key) -> memory-mapped array, so every fold and seed of a CV
# run shares one mapping; and cache folder -> content-hash index, read from disk once.
_ARRAYS: dict[tuple[str, str], np.ndarray] = {}
_HASH_INDEXES: dict[str, dict[str, list]] = {}
# Per process: (cache folder, size) -> absolute path -> (cache, row) of every decoded file.
_ROWS: dict[tuple[str, int], dict[str, tuple[DecodedImageCache, int]]] = {}


def resize_square(image: np.ndarray, size: int | None) -> np.ndarray:
    """Resize to size x size (the reference resizes screenshots to a square input)."""
    if size is None or image.shape == (size, size):
        return image
    interpolation = cv2.INTER_AREA if min(image.shape) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def cache_root() -> Path:
    """tus's per-user cache folder: ``$TUS_CACHE_DIR``, else ``$XDG_CACHE_HOME/tus``, else ``~/.cache/tus``."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tus"


def default_cache_dir() -> Path:
    """The decoded-image cache: ``images/`` in :func:`cache_root`."""
    return cache_root() / "images"


def clear_memory_cache() -> None:
    """Forget this process's mappings, row registry and hash indexes (the files on disk stay)."""
    _ARRAYS.clear()
    _HASH_INDEXES.clear()
    _ROWS.clear()


def _stat_key(path: Path) -> list[int]:
    # ctime cannot be set from user space and changes on every write, so a file rewritten
    # with its old size and mtime restored still gets a new key.
    # A DICOM frame ("file.dcm#frame3") changes when its file does.
    stat = split_frame(path)[0].stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


class ContentHashIndex:
    """SHA-1 of each file's bytes, remembered per (path, size, mtime, ctime, inode).

    Lost updates between concurrent processes only cost a rehash, so the index is written
    atomically but without a lock.
    """

    def __init__(self, cache_dir: Path):
        self.path = cache_dir / HASH_INDEX_NAME
        folder = str(cache_dir)
        if folder not in _HASH_INDEXES:
            _HASH_INDEXES[folder] = self._read()
        self.entries = _HASH_INDEXES[folder]

    def _read(self) -> dict[str, list]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def hashes(self, paths: Sequence[Path]) -> list[str]:
        """Content hashes of ``paths`` in order, hashing only new or changed files."""
        result, changed = [], False
        for path in paths:
            name = os.path.abspath(path)
            try:
                stat = _stat_key(path)
            except FileNotFoundError as error:
                raise ImageReadError(f"{path}: file not found") from error
            entry = self.entries.get(name)
            if entry is None or entry[:-1] != stat:
                entry = [*stat, content_hash(path)]
                self.entries[name] = entry
                changed = True
            result.append(entry[-1])
        if changed:
            # Merge with what other processes wrote meanwhile; ours win where both have a file.
            merged = {**self._read(), **self.entries}
            self.entries.update(merged)
            _atomic_write_bytes(self.path, json.dumps(merged).encode())
        return result


def cache_key(hashes: Sequence[str], size: int) -> str:
    """Hex key of an ordered list of content hashes at ``size`` with the current method."""
    payload = json.dumps({"version": FORMAT_VERSION, "method": RESIZE_METHOD, "size": size, "files": list(hashes)})
    return hashlib.sha1(payload.encode()).hexdigest()


def decode_resized(path: str | Path, size: int) -> np.ndarray:
    """One image exactly as :class:`tus.data.datasets.ManifestDataset` sees it before its transform."""
    return resize_square(read_grayscale(path), size)


class DecodedImageCache:
    """The images at ``paths``, decoded and resized to ``size`` x ``size``, as one on-disk array.

    Building it computes the key (hashing new or changed files), then maps the cached
    ``.npy`` file, decoding only if no process has built it before. ``decoded`` counts the
    images this instance decoded (0 when the file or this process's mapping was reused).
    Indexing returns a writable copy of one image; :attr:`array` is the read-only map.
    Pickling (``spawn`` DataLoader workers, ``ddp_spawn``) sends the file name, not pixels.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        size: int,
        cache_dir: str | Path | None = None,
        *,
        workers: int | None = None,
    ):
        if size is None or int(size) != size or size <= 0:
            raise ValueError(f"the on-disk image cache needs a positive integer size, got {size!r}")
        self.paths = [Path(p) for p in paths]
        self.size = int(size)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.key = cache_key(ContentHashIndex(self.cache_dir).hashes(self.paths), size)
        self.file = self.cache_dir / f"{self.key}.npy"
        self.decoded = 0
        self._workers = workers or min(8, os.cpu_count() or 1)
        self._array: np.ndarray | None = None
        if (str(self.cache_dir), self.key) not in _ARRAYS and not self.file.is_file():
            self._build()
        self._array = self.array

    def _build(self) -> None:
        with FileLock(str(self.file) + ".lock"):
            if self.file.is_file():  # another process built it while we waited
                return
            handle, temp = tempfile.mkstemp(dir=self.cache_dir, prefix=self.file.name + ".", suffix=".tmp")
            os.close(handle)
            try:
                shape = (len(self.paths), self.size, self.size)
                target = np.lib.format.open_memmap(temp, mode="w+", dtype=np.uint8, shape=shape)
                # Pillow and OpenCV release the GIL while decoding and resizing.
                with ThreadPoolExecutor(self._workers) as pool:
                    list(pool.map(partial(self._fill, target), range(len(self.paths))))
                target.flush()
                del target  # unmap before the file is renamed and reopened read-only
                os.replace(temp, self.file)
                self.decoded = len(self.paths)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise

    def _fill(self, target: np.ndarray, row: int) -> None:
        image = decode_resized(self.paths[row], self.size)
        if image.shape != target.shape[1:] or image.dtype != np.uint8:
            raise ValueError(f"{self.paths[row]}: decoded to {image.dtype} {image.shape}, expected uint8 {target.shape[1:]}")
        target[row] = image

    def _open(self) -> np.ndarray:
        array = np.load(self.file, mmap_mode="r")
        expected = (len(self.paths), self.size, self.size)
        if array.shape != expected or array.dtype != np.uint8:
            raise ValueError(f"{self.file}: holds {array.dtype} {array.shape}, expected uint8 {expected}; delete it")
        return array

    @property
    def array(self) -> np.ndarray:
        """All images, ``(N, size, size)`` uint8, memory-mapped read-only."""
        if self._array is None:  # first use, or unpickled in another process
            memo = (str(self.cache_dir), self.key)
            if memo not in _ARRAYS:
                _ARRAYS[memo] = self._open()
            self._array = _ARRAYS[memo]
        return self._array

    def get(self, index: int) -> np.ndarray:
        """Image ``index`` as a writable (size, size) uint8 array."""
        return np.array(self.array[index])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: Sequence[int] | np.ndarray) -> CachedImageSubset:
        """A view of ``rows`` (e.g. one fold's rows of the full manifest) sharing this array."""
        return CachedImageSubset(self, rows)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_array"] = None
        return state


class CachedImageSubset:
    """Rows of a :class:`DecodedImageCache`, indexed from 0 like a dataset over a sub-frame."""

    def __init__(self, cache: DecodedImageCache, rows: Sequence[int] | np.ndarray):
        self.cache = cache
        self.rows = np.asarray(rows, dtype=np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= len(cache)):
            raise IndexError(f"rows out of range for a cache of {len(cache)} images")

    def __getitem__(self, index: int) -> np.ndarray:
        return self.cache.get(int(self.rows[index]))

    def __len__(self) -> int:
        return len(self.rows)


class CachedImages:
    """Images at given rows of one or more :class:`DecodedImageCache` s, indexed from 0.

    A dataset over a frame built from several sources (e.g. a probe bank drawn across a
    pool's manifests) gets its rows from each source's cache. Pickling sends each cache once
    (pickle's memo), i.e. file names and row numbers, not pixels.
    """

    def __init__(self, caches: Sequence[DecodedImageCache], which: np.ndarray, rows: np.ndarray):
        self.caches = list(caches)
        self.which = np.asarray(which, dtype=np.int64)
        self.rows = np.asarray(rows, dtype=np.int64)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.caches[self.which[index]].get(int(self.rows[index]))

    def __len__(self) -> int:
        return len(self.rows)


def cached_images(paths: Sequence[str | Path], size: int, cache_dir: str | Path | None = None, *, workers: int | None = None) -> CachedImages:
    """``paths`` decoded at ``size``, reusing every row this process has already decoded.

    Files not yet seen (by absolute path, in this cache folder at this size) are decoded, in
    their given order, into one new :class:`DecodedImageCache` (or found on disk by content).
    Files are assumed not to change while a process runs; a later process rehashes them.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    known = _ROWS.setdefault((str(folder), int(size)), {})
    names = [os.path.abspath(p) for p in paths]
    missing = list(dict.fromkeys(name for name in names if name not in known))
    if missing:
        cache = DecodedImageCache(missing, size, folder, workers=workers)
        known.update((name, (cache, row)) for row, name in enumerate(missing))
    caches: dict[int, int] = {}  # id(cache) -> position in the list
    ordered: list[DecodedImageCache] = []
    which, rows = np.empty(len(names), dtype=np.int64), np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        cache, row = known[name]
        if id(cache) not in caches:
            caches[id(cache)] = len(ordered)
            ordered.append(cache)
        which[i], rows[i] = caches[id(cache)], row
    return CachedImages(ordered, which, rows)
