"""Reading ultrasound images as 8-bit single-channel arrays, and caching them decoded.

Every image in tus is a ``numpy.uint8`` array of shape (H, W). RGB screenshots are
converted with the ITU-R 601 luma transform, 16-bit images are rescaled to 0..255 by their
own range, and palette/alpha images are flattened: an image is never silently read as
three channels. The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so a photo
stored sideways is read the way a viewer shows it. Files tus cannot read faithfully are refused
with a message naming them: a multi-page TIFF (a stack or cine loop; export its frames as
separate images), a floating-point image holding NaN or infinity, and an image over PIL's
decompression-bomb pixel limit.
"""

from __future__ import annotations

import hashlib
import re
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tus.config import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DataError(ValueError):
    """An input file (image, manifest, weights) is missing, unreadable or wrong; the message names it.

    Command lines report it as one line and exit with code 1.
    """


class UsageError(ConfigError):
    """An option's value is invalid (a malformed ``--box``, an occupied ``--out``...); the message names it.

    A :class:`~tus.config.ConfigError`: command lines report it as one line and exit with code 2, like
    argparse's own errors.
    """


class OutputExistsError(UsageError):
    """An output option names a folder that exists and is not empty; tus never writes into one."""


class ImageReadError(DataError):
    """An image file is missing, unreadable, corrupt or not faithfully readable; the message names the file."""


def not_an_image_file(path: str | Path) -> str | None:
    """Why ``path`` cannot be an image file (``"file not found"``, ``"is a folder, not an image
    file"``, a FIFO, device or socket likewise), or None for a regular file: a folder given as an
    image is not "not found", and reading a FIFO would block."""
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        return "file not found"
    except NotADirectoryError:
        return "file not found (a parent of it is a file, not a folder)"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"is {kind}, not an image file"


def read_grayscale(path: str | Path) -> np.ndarray:
    """Decode ``path`` into a (H, W) uint8 array, upright according to its EXIF orientation."""
    path = Path(path)
    if (problem := not_an_image_file(path)) is not None:
        raise ImageReadError(f"{path}: {problem}")
    try:
        with Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise ImageReadError(f"{path}: multi-page image ({frames} pages); tus reads single images, so export each page (frame) as its own file")
            image.load()
            return to_uint8_gray(ImageOps.exif_transpose(image), path)
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"{path}: {_pixels(error)} pixels, over PIL's limit of {Image.MAX_IMAGE_PIXELS} (a decompression-bomb guard); downscale the image") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageReadError):
            raise
        raise ImageReadError(f"{path}: cannot decode image ({error})") from error


def _pixels(error: Image.DecompressionBombError) -> str:
    """The pixel count PIL's message states ("Image size (N pixels) exceeds ..."), else "too many"."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return found.group(1) if found else "too many"


def to_uint8_gray(image: Image.Image, source: str | Path = "image") -> np.ndarray:
    """Convert any PIL image to a (H, W) uint8 array without losing its dynamic range.

    A floating-point image with NaN or infinity is refused (``source`` names it): rescaling by its
    range would turn it into a blank image without a word.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise ImageReadError(f"{source}: floating-point image with {bad} NaN/infinite pixel(s)")
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
