"""Reading ultrasound images as 8-bit single-channel arrays, and caching them decoded.

Every image in tus is a ``numpy.uint8`` array of shape (H, W). RGB screenshots are
converted with the ITU-R 601 luma transform, 16-bit images are rescaled to 0..255 by their
own range, and palette/alpha images are flattened: an image is never silently read as
three channels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image file is missing, unreadable or corrupt; the message names the file."""


def read_grayscale(path: str | Path) -> np.ndarray:
    """Decode ``path`` into a (H, W) uint8 array."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    try:
        with Image.open(path) as image:
            image.load()
            return to_uint8_gray(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageReadError(f"{path}: cannot decode image ({error})") from error


def to_uint8_gray(image: Image.Image) -> np.ndarray:
    """Convert any PIL image to a (H, W) uint8 array without losing its dynamic range."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        return np.round((array - low) * scale).astype(np.uint8)
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8).copy()


def write_grayscale(path: str | Path, array: np.ndarray) -> None:
    """Write a (H, W) uint8 array as an 8-bit grayscale PNG, creating parent folders."""
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"expected a (H, W) uint8 array, got {array.dtype} {array.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="L").save(path)


def content_hash(path: str | Path) -> str:
    """SHA-1 of the file's bytes: the key for duplicate detection and feature caches."""
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
