"""Reading ultrasound images as 8-bit single-channel arrays, and caching them decoded.

Every image in tus is a ``numpy.uint8`` array of shape (H, W). RGB screenshots are
converted with the ITU-R 601 luma transform, 16-bit images are rescaled to 0..255 by their
own range, and palette/alpha images are flattened: an image is never silently read as
three channels. The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so a photo
stored sideways is read the way a viewer shows it. Files tus cannot read faithfully are refused
with a message naming them: a multi-page TIFF (a stack or cine loop; export its frames as
separate images), a floating-point image holding NaN or infinity, and an image over PIL's
decompression-bomb pixel limit.

DICOM files (a ``.dcm``/``.dicom`` suffix, or the ``DICM`` magic at byte 128) are read with
pydicom and give the same (H, W) uint8 image: the modality LUT (rescale) and the VOI LUT or
window are applied when present (and then map the VOI output range to 0..255), MONOCHROME1 is
inverted so that bright means echogenic as in MONOCHROME2, RGB/YBR/palette images go through
the same ITU-R 601 luma as an RGB PNG, and without a VOI an 8-bit image keeps its values while
a deeper one is rescaled by its own range (as a 16-bit PNG). A frame of a multi-frame DICOM (a
cine loop) is named ``file.dcm#frame<k>`` (k from 0); a multi-frame file named without a frame
is refused. A DICOM without pixel data, or compressed with a transfer syntax whose decoder
(pylibjpeg/GDCM) is not installed, is refused with the file named. Nothing but PatientID and
BodyPartExamined is ever taken from a DICOM's header (and only when a manifest asks with
``from_dicom``): patient names never reach an output.
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
DICOM_SUFFIXES = (".dcm", ".dicom")
# "scan.dcm#frame3": frame 3 (from 0) of a multi-frame DICOM, as a manifest row or a folds.csv names it.
FRAME_MARK = "#frame"
_FRAME_REFERENCE = re.compile(r"^(?P<file>.+)#frame(?P<index>\d+)$")


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


def split_frame(path: str | Path) -> tuple[Path, int | None]:
    """(file, frame index) of ``file.dcm#frame<k>``; (path, None) for a plain path.

    A file whose own name ends in ``#frame<k>`` stays a plain path."""
    text = str(path)
    found = _FRAME_REFERENCE.match(text)
    if found is None or Path(text).exists():
        return Path(text), None
    return Path(found["file"]), int(found["index"])


def frame_reference(path: str | Path, index: int) -> str:
    """The name of frame ``index`` of a multi-frame DICOM: ``path#frame<index>``."""
    return f"{path}{FRAME_MARK}{index}"


def is_dicom(path: str | Path) -> bool:
    """A DICOM file by suffix or by the ``DICM`` magic at byte 128 (of a readable regular file)."""
    path = split_frame(path)[0]
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def read_dicom_header(path: str | Path):
    """The DICOM's header (no pixel data read); refused with the file named when not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = split_frame(path)[0]
    try:
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            # A .dcm without the 128-byte preamble (older exports) is still DICOM.
            return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as error:  # pydicom raises many kinds on a corrupt header
        raise ImageReadError(f"{path}: cannot read DICOM header ({type(error).__name__}: {error})") from error


def dicom_frame_count(header) -> int:
    """Frames in a DICOM (NumberOfFrames; 1 when absent)."""
    try:
        return max(1, int(header.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def dicom_pixel_problem(path: str | Path, header) -> str | None:
    """Why a DICOM's pixels cannot be decoded here (no pixel data; a compressed transfer syntax
    whose decoder is not installed), or None."""
    from pydicom.pixels import get_decoder

    if not any(tag in header for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")) and not _has_pixel_data_after_header(path):
        return "DICOM without pixel data (a report or structured document?); nothing to read"
    syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return None
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"DICOM compressed as {syntax.name} ({syntax}), which pydicom cannot decode"
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        return f"DICOM compressed as {syntax.name} ({syntax}) but no decoder for it is installed ({missing}); install pylibjpeg with its plugins or python-gdcm"
    return None


def _has_pixel_data_after_header(path: str | Path) -> bool:
    # stop_before_pixels hides (7FE0,0010) from the header: look for it without decoding.
    import pydicom

    with pydicom.dcmread(split_frame(path)[0], force=True, specific_tags=["PixelData"]) as dataset:
        return "PixelData" in dataset


def read_dicom_grayscale(path: str | Path) -> np.ndarray:
    """One frame of a DICOM as a (H, W) uint8 array (see the module's docstring for the conventions)."""
    import pydicom

    file, frame = split_frame(path)
    header = read_dicom_header(file)
    if (problem := dicom_pixel_problem(file, header)) is not None:
        raise ImageReadError(f"{file}: {problem}")
    frames = dicom_frame_count(header)
    if frame is None and frames > 1:
        raise ImageReadError(f"{file}: multi-frame DICOM ({frames} frames); name a frame as {file.name}{FRAME_MARK}<k> or set data.dicom_frames in a manifest's config")
    if frame is not None and frame >= frames:
        raise ImageReadError(f"{file}: frame {frame} requested but the DICOM has {frames} frame(s) (0..{frames - 1})")
    index = frame if frames > 1 else None
    try:
        try:
            # From the file, pydicom reads only the requested frame of a loop.
            pixels = pydicom.pixels.pixel_array(file, index=index)
        except Exception:  # e.g. a file without the preamble, which only dcmread(force=True) reads
            pixels = pydicom.pixels.pixel_array(pydicom.dcmread(file, force=True), index=index)
        return _dicom_to_uint8_gray(pixels, header)
    except ImageReadError:
        raise
    except Exception as error:  # a truncated or inconsistent pixel stream
        raise ImageReadError(f"{file}: cannot decode DICOM pixel data ({type(error).__name__}: {error})") from error


def _dicom_to_uint8_gray(pixels: np.ndarray, dataset) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, dataset)
        pixels = np.round(pixels / 257.0).astype(np.uint8) if pixels.dtype != np.uint8 else pixels
    if pixels.ndim == 3:
        # RGB, or YBR already converted to RGB by pixel_array: the luma an RGB PNG gets.
        rgb = pixels if pixels.dtype == np.uint8 else np.clip(np.round(pixels), 0, 255).astype(np.uint8)
        return to_uint8_gray(Image.fromarray(np.ascontiguousarray(rgb[..., :3]), mode="RGB"))
    if pixels.ndim != 2:
        raise ImageReadError(f"unexpected DICOM pixel array shape {pixels.shape}")
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    voi_range = _voi_output_range(dataset)
    if voi_range is not None:
        values = apply_voi_lut(values, dataset, index=0).astype(np.float64)
        low, high = voi_range
    elif pixels.dtype == np.uint8 and "RescaleSlope" not in dataset and "ModalityLUTSequence" not in dataset:
        low, high = 0.0, 255.0
    else:
        low, high = float(values.min()), float(values.max())
    if not np.isfinite(values).all():
        raise ImageReadError(f"DICOM pixel data with {int((~np.isfinite(values)).sum())} NaN/infinite value(s)")
    scale = 255.0 / (high - low) if high > low else 0.0
    gray = np.round(np.clip((values - low) * scale, 0, 255)).astype(np.uint8)
    return 255 - gray if photometric == "MONOCHROME1" else gray


def _voi_output_range(dataset) -> tuple[float, float] | None:
    """The range a VOI LUT or window maps into (PS3.3 C.11.2, as pydicom's apply_voi_lut), or None
    when the DICOM has no VOI."""
    sequence = dataset.get("VOILUTSequence")
    if sequence:
        bits = int(sequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None
    bits = int(dataset.BitsStored)
    if dataset.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(dataset.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(dataset.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = dataset.get("RescaleSlope"), dataset.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def read_grayscale(path: str | Path) -> np.ndarray:
    """Decode ``path`` into a (H, W) uint8 array, upright according to its EXIF orientation.

    ``path`` may be a DICOM file, or a frame of one (``file.dcm#frame<k>``)."""
    file, frame = split_frame(path)
    if (problem := not_an_image_file(file)) is not None:
        raise ImageReadError(f"{file}: {problem}")
    if frame is not None or is_dicom(file):
        return read_dicom_grayscale(path)
    path = file
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


def write_dicom(
    path: str | Path,
    frames: np.ndarray,
    *,
    patient_id: str,
    patient_name: str = "",
    body_part: str = "",
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    regions: list[tuple[int, int, int, int]] | None = None,
) -> Path:
    """Write a new uncompressed ultrasound DICOM (phantoms and tests): ``frames`` is (H, W) or
    (F, H, W) uint8/uint16 grey, or (H, W, 3) / (F, H, W, 3) uint8 RGB. ``window`` is (center,
    width); ``regions`` are (x0, y0, x1, y1) boxes written as the Sequence of Ultrasound Regions.
    Refuses to overwrite: tus never writes into an existing DICOM."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, UltrasoundMultiFrameImageStorage, generate_uid

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: exists; tus never writes into a DICOM file")
    frames = np.asarray(frames)
    colour = photometric in ("RGB", "YBR_FULL")
    single = frames.ndim == (3 if colour else 2)
    stack = frames[None] if single else frames
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage if single else UltrasoundMultiFrameImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "US"
    dataset.PatientID = patient_id
    dataset.PatientName = patient_name
    if body_part:
        dataset.BodyPartExamined = body_part
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.Rows, dataset.Columns = int(stack.shape[1]), int(stack.shape[2])
    dataset.SamplesPerPixel = 3 if colour else 1
    dataset.PhotometricInterpretation = photometric
    if colour:
        dataset.PlanarConfiguration = 0
    bits = 16 if stack.dtype == np.uint16 else 8
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = bits, bits, bits - 1, 0
    if not single:
        dataset.NumberOfFrames = int(stack.shape[0])
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = float(window[0]), float(window[1])
    if regions:
        items = []
        for x0, y0, x1, y1 in regions:
            item = Dataset()
            item.RegionLocationMinX0, item.RegionLocationMinY0, item.RegionLocationMaxX1, item.RegionLocationMaxY1 = int(x0), int(y0), int(x1), int(y1)
            item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = 1, 1, 0
            items.append(item)
        dataset.SequenceOfUltrasoundRegions = items
    dataset.PixelData = np.ascontiguousarray(stack.astype(np.uint16 if bits == 16 else np.uint8)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def content_hash(path: str | Path) -> str:
    """SHA-1 of the file's bytes: the key for duplicate detection and feature caches.

    A frame of a DICOM (``file.dcm#frame<k>``) hashes the file's bytes and then the frame's
    name, so the frames of one cine loop are told apart."""
    file, frame = split_frame(path)
    digest = hashlib.sha1()
    if frame is not None:
        digest.update(content_hash(file).encode() + f"{FRAME_MARK}{frame}".encode())
        return digest.hexdigest()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_images(folder: str | Path, *, dicom: bool = False) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; DICOM files too with ``dicom``
    (for readers that expand a cine loop into frames; generated-image folders hold none)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    suffixes = IMAGE_SUFFIXES + DICOM_SUFFIXES if dicom else IMAGE_SUFFIXES
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)


def dicom_tag_text(path: str | Path, keyword: str) -> str:
    """A DICOM header element as stripped text ('' when absent). Only for the elements a manifest
    may ask for (PatientID, BodyPartExamined): nothing identifying beyond them is ever read out."""
    if keyword not in ("PatientID", "BodyPartExamined"):
        raise ValueError(f"tus reads only PatientID and BodyPartExamined from a DICOM header, not {keyword}")
    value = read_dicom_header(path).get(keyword, "")
    return str(value).strip() if value is not None else ""
