"""Field-of-view detection and dual-view splitting for clinical ultrasound screenshots.

Clinical frames are screenshots: one or two B-mode views (transverse and sagittal side by
side in TesticulUS) on a black screen with text, rulers and logos around them. Each view
is cropped out and becomes its own sample inheriting the screenshot's label (TesticulUS
thesis, Sec. 3 and Fig. 8.2: threshold, connected components, tight bounding boxes).

DICOM rows are cropped frame by frame (a cine loop's frames chosen by ``dicom_frames``, as
:func:`tus.data.manifest.expand_dicom_rows` does when a manifest loads). A DICOM's own
Sequence of Ultrasound Regions (0018,6011) gives its views when present (its 2-D regions, the
region's inclusive MaxX1/MaxY1 made exclusive); the image analysis is used otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from tus.data.images import ImageReadError, UsageError, is_dicom, read_dicom_header, read_grayscale, split_frame, write_grayscale
from tus.data.manifest import expand_dicom_rows, read_manifest
from tus.data.outputs import check_output_folder, claim_output, staged_folder

Box = tuple[int, int, int, int]
# Beside a cropped dataset's manifest: how its views were cut (crop_recipe).
CROP_RECIPE_FILE = "crop.json"


def detect_fields_of_view(
    image: np.ndarray,
    *,
    threshold: float | None = None,
    min_area_fraction: float = 0.05,
    max_views: int = 2,
    margin: int = 0,
) -> list[Box]:
    """Boxes ``(x0, y0, x1, y1)`` of the ultrasound views in a screenshot, left to right.

    ``x1``/``y1`` are exclusive, so a view is ``image[y0:y1, x0:x1]``. Pixels of the
    median-filtered image brighter than ``threshold`` are foreground. The default is half
    of Otsu's threshold: Otsu separates the black screen from *typical* tissue, but views
    also hold much darker tissue (deep attenuated regions, hypoechoic muscle, acoustic
    shadows) that plain Otsu cuts away, shrinking boxes and splitting a single view in
    two; half of it still sits far above the screen's black and its compression noise.
    A closing fills the dark speckle holes inside a view and an opening with a
    kernel of ~4% of the shorter side erases text, markers and thin bars. Of the remaining
    connected components, those covering at least ``min_area_fraction`` of the image are
    views; the ``max_views`` largest are kept. ``margin`` pixels are added around each box
    (clipped to the image). Returns an empty list when nothing qualifies.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a (H, W) uint8 image, got {image.dtype} {image.shape}")
    height, width = image.shape
    short_side = min(height, width)
    # Kernel sizes scale with the screenshot, so the same defaults work at 128 px and 1080 px.
    small = _odd(short_side * 0.01)
    large = _odd(short_side * 0.04)
    smoothed = cv2.medianBlur(image, small)
    if threshold is None:
        otsu_threshold, _ = cv2.threshold(smoothed, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = otsu_threshold / 2
    foreground = (smoothed > threshold).astype(np.uint8)
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_CLOSE, np.ones((small, small), np.uint8))
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, np.ones((large, large), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    # Row 0 of stats is the background.
    components = [stats[label] for label in range(1, count) if stats[label, cv2.CC_STAT_AREA] >= min_area_fraction * height * width]
    components.sort(key=lambda stat: -int(stat[cv2.CC_STAT_AREA]))
    boxes = []
    for stat in components[:max_views]:
        x0, y0 = int(stat[cv2.CC_STAT_LEFT]), int(stat[cv2.CC_STAT_TOP])
        x1, y1 = x0 + int(stat[cv2.CC_STAT_WIDTH]), y0 + int(stat[cv2.CC_STAT_HEIGHT])
        boxes.append((max(0, x0 - margin), max(0, y0 - margin), min(width, x1 + margin), min(height, y1 + margin)))
    return sorted(boxes)


def parse_box(text: str, option: str = "--box") -> Box:
    """``"X0,Y0,X1,Y1"`` (four integers, exclusive ends) as a box; :class:`UsageError` naming ``option`` otherwise."""
    parts = [part.strip() for part in str(text).split(",")]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 4 or len(parts) != 4:
        raise UsageError(f"{option} {text!r}: expected four integers X0,Y0,X1,Y1 (exclusive ends), e.g. 0,0,256,256")
    x0, y0, x1, y1 = values
    if not (0 <= x0 < x1 and 0 <= y0 < y1):
        raise UsageError(f"{option} {text!r}: needs 0 <= X0 < X1 and 0 <= Y0 < Y1")
    return x0, y0, x1, y1


def _odd(value: float) -> int:
    """The nearest odd integer >= 3: median and morphology kernels need an odd size."""
    return max(3, round(value) // 2 * 2 + 1)


def crop_manifest(
    manifest_csv: str | Path,
    out_dir: str | Path,
    *,
    fixed_boxes: Sequence[Sequence[int]] | None = None,
    preview_count: int = 16,
    seed: int = 0,
    dicom_frames: str | int = "middle",
    **detect_kwargs: Any,
) -> Path:
    """Crop every view of every image in a manifest into a new dataset; return its manifest.

    The manifest's ``path`` column is relative to the manifest's folder or absolute. Each
    crop is written to ``out_dir/images/`` and gets a row in ``out_dir/manifest.csv``
    inheriting all columns of its source row, with ``path`` (relative to ``out_dir``),
    ``source_path`` (the source image, relative to ``out_dir`` when the source manifest
    used relative paths), ``view_index``, ``box`` (``"x0,y0,x1,y1"``, exclusive ends) and
    ``sample_id`` = ``<source sample_id, or its path>#view<k>``. ``fixed_boxes`` replaces
    detection with the same boxes for every image; ``detect_kwargs`` go to
    :func:`detect_fields_of_view`. ``out_dir/preview.png`` shows ``preview_count``
    randomly chosen (``seed``) source images with their boxes, for a person to check.

    Output is built in a temporary sibling folder and moved into place only when every
    row succeeded, so a failure leaves no half-written dataset. Raises OutputExistsError (a
    UsageError) if ``out_dir`` exists and is not empty, UsageError for a malformed fixed box, and
    ImageReadError naming the manifest line and image when an image cannot be read, has no field
    of view or a fixed box does not fit it.
    """
    manifest_csv = Path(manifest_csv)
    out_dir = Path(out_dir)
    # Options are checked before any image: a bad one would otherwise surface as "no field of
    # view" on the first image, blaming the data.
    if detect_kwargs.get("max_views", 1) < 1:
        raise UsageError(f"--max-views must be >= 1 (views kept per image), got {detect_kwargs['max_views']}")
    check_output_folder(out_dir, "--out")
    if fixed_boxes is not None:
        fixed_boxes = [parse_box(",".join(str(v) for v in box)) if not isinstance(box, str) else parse_box(box) for box in fixed_boxes]
    # read_manifest refuses empty files and repeated columns; its derived columns are not carried over.
    parsed = read_manifest(manifest_csv)
    problems: list = []
    parsed = expand_dicom_rows(parsed, dicom_frames, lambda row: f"{manifest_csv} line {row.line} ({row.path})", problems)
    if problems:
        raise ImageReadError(str(problems[0]))
    lines = parsed["line"].tolist()
    sample_ids = parsed["sample_id"].tolist()
    # Columns after abs_path (a sample_id defaulted to the path) were added by read_manifest, not written.
    written = list(parsed.columns[: list(parsed.columns).index("abs_path")])
    source = parsed[written]
    rng = np.random.default_rng(seed)
    preview_rows = set(rng.choice(len(source), size=min(preview_count, len(source)), replace=False).tolist())

    with claim_output(out_dir, "--out"):  # writable and locked, before any image is cropped
        return _crop_into(out_dir, manifest_csv, source, lines, sample_ids, fixed_boxes, preview_rows, detect_kwargs)


def _crop_into(out_dir: Path, manifest_csv: Path, source: pd.DataFrame, lines: list, sample_ids: list, fixed_boxes, preview_rows: set, detect_kwargs: dict) -> Path:
    preview_items: list[tuple[np.ndarray, list[Box]]] = []
    recipe = crop_recipe(fixed_boxes, detect_kwargs)
    with staged_folder(out_dir) as staging:
        crop_rows = []
        for position, row in enumerate(source.to_dict("records")):
            image_path = Path(row["path"])
            resolved = image_path if image_path.is_absolute() else manifest_csv.parent / image_path
            where = f"{manifest_csv} line {lines[position]}"
            try:
                image = read_grayscale(resolved)
            except ImageReadError as error:
                raise ImageReadError(f"{where}: {error}") from error
            boxes = view_boxes(image, resolved, recipe, f"{where} ({row['path']})")
            if position in preview_rows:
                preview_items.append((image, boxes))
            source_path = str(resolved) if image_path.is_absolute() else os.path.relpath(resolved, out_dir)
            source_id = sample_ids[position] or row["path"]
            frame_index = split_frame(resolved)[1]
            frame_tag = "" if frame_index is None else f"_frame{frame_index}"
            for view_index, (x0, y0, x1, y1) in enumerate(boxes):
                crop_path = f"images/{position:05d}_{image_path.stem}{frame_tag}_view{view_index}.png"
                write_grayscale(staging / crop_path, np.ascontiguousarray(image[y0:y1, x0:x1]))
                crop_rows.append(
                    {
                        **row,
                        "path": crop_path,
                        "source_path": source_path,
                        "view_index": view_index,
                        "box": f"{x0},{y0},{x1},{y1}",
                        "sample_id": f"{source_id}#view{view_index}",
                    }
                )
        columns = list(dict.fromkeys([*source.columns, "source_path", "view_index", "box", "sample_id"]))
        pd.DataFrame(crop_rows, columns=columns).to_csv(staging / "manifest.csv", index=False)
        (staging / CROP_RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
        _write_preview(staging / "preview.png", preview_items)
    return out_dir / "manifest.csv"


def crop_recipe(fixed_boxes: Sequence[Sequence[int]] | None = None, detect_kwargs: dict | None = None) -> dict:
    """How views are cut out of an image, as JSON: the same fixed boxes for every image, or the
    DICOM's ultrasound regions when it has them and :func:`detect_fields_of_view` (with these
    keyword arguments) otherwise. Written beside a cropped dataset (``crop.json``), carried into
    the models trained on it, and followed by ``tus predict`` on uncropped images."""
    return {
        "format_version": 1,
        "fixed_boxes": [list(map(int, box)) for box in fixed_boxes] if fixed_boxes else None,
        "detect": dict(detect_kwargs or {}),
        "dicom_regions": fixed_boxes is None,
    }


def read_crop_recipe(manifest_csv: str | Path) -> dict | None:
    """The ``crop.json`` recipe of the dataset ``manifest_csv`` belongs to (None: not made by ``tus data crop``)."""
    path = Path(manifest_csv).parent / CROP_RECIPE_FILE
    if not path.is_file():
        return None
    try:
        recipe = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path}: not a readable crop recipe ({error})") from error
    if not isinstance(recipe, dict) or recipe.get("format_version") != 1 or not isinstance(recipe.get("detect"), dict):
        raise UsageError(f"{path}: not a crop recipe of this tus (format_version 1 with 'detect' and 'fixed_boxes')")
    return recipe


def view_boxes(image: np.ndarray, path: str | Path, recipe: dict, where: str) -> list[Box]:
    """The views of ``image`` (read from ``path``) by ``recipe`` (:func:`crop_recipe`), left to right;
    ImageReadError naming ``where`` when there is none or a fixed box does not fit."""
    if recipe.get("fixed_boxes"):
        return [_checked_box(box, image.shape, where) for box in recipe["fixed_boxes"]]
    boxes = ultrasound_regions(path, image.shape) if recipe.get("dicom_regions", True) else []
    if not boxes:
        boxes = detect_fields_of_view(image, **recipe["detect"])
    if not boxes:
        raise ImageReadError(f"{where}: no field of view detected in {split_frame(path)[0]}")
    return boxes


def ultrasound_regions(path: str | Path, shape: tuple[int, int]) -> list[Box]:
    """The views a DICOM's Sequence of Ultrasound Regions gives, left to right (2-D regions, or
    all when none says its format), clipped to the image; [] for other files or without one."""
    file = split_frame(path)[0]
    if not is_dicom(file):
        return []
    regions = read_dicom_header(file).get("SequenceOfUltrasoundRegions") or []
    two_d = [r for r in regions if int(r.get("RegionSpatialFormat", 1) or 0) == 1] or list(regions)
    height, width = shape
    boxes = []
    for region in two_d:
        try:
            x0, y0 = int(region.RegionLocationMinX0), int(region.RegionLocationMinY0)
            x1, y1 = int(region.RegionLocationMaxX1) + 1, int(region.RegionLocationMaxY1) + 1
        except AttributeError:
            continue
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        if x0 < x1 and y0 < y1:
            boxes.append((x0, y0, x1, y1))
    return sorted(boxes)


def _checked_box(box: Sequence[int], shape: tuple[int, int], name: str) -> Box:
    x0, y0, x1, y1 = (int(value) for value in box)
    height, width = shape
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ImageReadError(f"{name}: fixed box {tuple(box)} does not fit the {width}x{height} image")
    return x0, y0, x1, y1


def _write_preview(path: Path, items: list[tuple[np.ndarray, list[Box]]], cell: int = 256) -> None:
    """A grid of thumbnails with the boxes drawn in colour (view 0 red, view 1 green, ...)."""
    colours = ((255, 40, 40), (40, 220, 40), (60, 120, 255), (255, 200, 0))
    columns = max(1, int(np.ceil(np.sqrt(len(items)))))
    rows = max(1, int(np.ceil(len(items) / columns)))
    grid = np.zeros((rows * cell, columns * cell, 3), dtype=np.uint8)
    for index, (image, boxes) in enumerate(items):
        scale = cell / max(image.shape)
        thumbnail = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))), interpolation=cv2.INTER_AREA)
        thumbnail = np.ascontiguousarray(np.repeat(thumbnail[:, :, None], 3, axis=2))
        for view_index, (x0, y0, x1, y1) in enumerate(boxes):
            cv2.rectangle(thumbnail, (int(x0 * scale), int(y0 * scale)), (max(0, int(x1 * scale) - 1), max(0, int(y1 * scale) - 1)), colours[view_index % len(colours)], 2)
        top, left = (index // columns) * cell, (index % columns) * cell
        grid[top : top + thumbnail.shape[0], left : left + thumbnail.shape[1]] = thumbnail
    Image.fromarray(grid, mode="RGB").save(path)
