"""Procedural burned-in markers like the ones clinicians leave on ultrasound screenshots.

Saved clinical frames often carry calipers, crosses, arrows, body-marker text and depth
scales. A classifier can latch onto them (TesticulUS, Fig. 5: Grad-CAM drifts to the
markers), so training inserts random synthetic ones to make the model marker-invariant,
and evaluation inserts them to measure how much predictions move.

Markers are drawn in two steps: :func:`sample_marker_layer` draws a layer (values and a
mask) from the random generator alone, and the layer is composited onto the image. The
draw never looks at pixel values, so the same generator state gives the same markers on
any image of the same size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import BaseTransformInitSchema

from tus.data.configs import MARKER_TYPES as MARKER_TYPES
from tus.data.configs import MarkerConfig as MarkerConfig

# Annotations commonly typed on scrotal/thyroid screenshots (Italian DX/SX for right/left).
TEXT_LABELS = ("L", "R", "DX", "SX", "TEST", "LONG", "TRASV", "1", "2", "+")

# Below this many pixels a glyph or a cross collapses to a blob nobody would read as a
# marker; small images still get recognisable (if relatively larger) markers.
MIN_MARKER_PX = 5


def draw_markers(image: np.ndarray, rng: np.random.Generator, config: MarkerConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Burn random markers into a copy of a (H, W) uint8 image.

    Returns ``(marked, mask)``: ``mask`` is True exactly where a marker pixel was written;
    every other pixel of ``marked`` equals ``image``. ``image`` is never modified.
    """
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a (H, W) uint8 image, got {image.dtype} {image.shape}")
    values, mask = sample_marker_layer(image.shape, rng, config)
    marked = image.copy()
    marked[mask] = values[mask]
    return marked, mask


def sample_marker_layer(shape: tuple[int, ...], rng: np.random.Generator, config: MarkerConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw a marker layer for an image of ``shape`` (only H, W are used).

    Returns ``(values, mask)``, a (H, W) uint8 array of marker gray levels and the (H, W)
    bool mask of the pixels they cover. Later markers overwrite earlier ones.
    """
    config = config or MarkerConfig()
    height, width = int(shape[0]), int(shape[1])
    values = np.zeros((height, width), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    count = int(rng.integers(config.min_count, config.max_count + 1))
    for _ in range(count):
        marker_type = config.types[int(rng.integers(len(config.types)))]
        intensity = int(rng.integers(config.intensity_range[0], config.intensity_range[1] + 1))
        thickness = int(rng.integers(config.thickness_range[0], config.thickness_range[1] + 1))
        size_px = max(MIN_MARKER_PX, float(rng.uniform(*config.size_range)) * min(height, width))
        stroke = np.zeros((height, width), dtype=np.uint8)
        MARKER_PAINTERS[marker_type](stroke, rng, size_px, thickness)
        drawn = stroke > 0
        values[drawn] = intensity
        mask |= drawn
    return values, mask


def _random_point(rng: np.random.Generator, canvas: np.ndarray, border: float) -> tuple[int, int]:
    """A point at least ``border`` pixels from the edges when the image is large enough."""
    height, width = canvas.shape
    x_margin = min(border, (width - 1) / 2)
    y_margin = min(border, (height - 1) / 2)
    x = rng.uniform(x_margin, width - 1 - x_margin)
    y = rng.uniform(y_margin, height - 1 - y_margin)
    return int(round(x)), int(round(y))


def _paint_cross(canvas: np.ndarray, center: tuple[int, int], arm: int, thickness: int, diagonal: bool) -> None:
    x, y = center
    if diagonal:
        cv2.line(canvas, (x - arm, y - arm), (x + arm, y + arm), 255, thickness, cv2.LINE_8)
        cv2.line(canvas, (x - arm, y + arm), (x + arm, y - arm), 255, thickness, cv2.LINE_8)
    else:
        cv2.line(canvas, (x - arm, y), (x + arm, y), 255, thickness, cv2.LINE_8)
        cv2.line(canvas, (x, y - arm), (x, y + arm), 255, thickness, cv2.LINE_8)


def _paint_cross_plus(canvas: np.ndarray, rng: np.random.Generator, size_px: float, thickness: int) -> None:
    arm = max(2, int(round(size_px / 2)))
    _paint_cross(canvas, _random_point(rng, canvas, arm), arm, thickness, diagonal=False)


def _paint_cross_x(canvas: np.ndarray, rng: np.random.Generator, size_px: float, thickness: int) -> None:
    arm = max(2, int(round(size_px / 2)))
    _paint_cross(canvas, _random_point(rng, canvas, arm), arm, thickness, diagonal=True)


def _paint_caliper_line(canvas: np.ndarray, rng: np.random.Generator, size_px: float, thickness: int) -> None:
    """Two caliper crosses joined by a dotted line, as left by a distance measurement."""
    height, width = canvas.shape
    arm = max(2, int(round(size_px / 3)))
    start = np.array(_random_point(rng, canvas, arm), dtype=float)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(2 * size_px, max(2 * size_px, 0.6 * min(height, width)))
    direction = np.array([np.cos(angle), np.sin(angle)])
    end = start + length * direction
    # Keep the second caliper on screen: measurements are only ever made inside the image.
    end = np.clip(end, [arm, arm], [max(arm, width - 1 - arm), max(arm, height - 1 - arm)])
    diagonal = bool(rng.integers(2))
    for point in (start, end):
        _paint_cross(canvas, (int(round(point[0])), int(round(point[1]))), arm, thickness, diagonal)
    span = float(np.hypot(*(end - start)))
    dash = max(1.0, thickness + 1.0)
    for offset in np.arange(arm + dash, span - arm - dash, 2 * dash):
        first = start + (end - start) * (offset / span)
        second = start + (end - start) * ((offset + dash / 2) / span)
        cv2.line(
            canvas,
            (int(round(first[0])), int(round(first[1]))),
            (int(round(second[0])), int(round(second[1]))),
            255,
            thickness,
            cv2.LINE_8,
        )


def _paint_circle(canvas: np.ndarray, rng: np.random.Generator, size_px: float, thickness: int) -> None:
    radius = max(2, int(round(size_px / 2)))
    cv2.circle(canvas, _random_point(rng, canvas, radius), radius, 255, thickness, cv2.LINE_8)


def _paint_arrow(canvas: np.ndarray, rng: np.random.Generator, size_px: float, thickness: int) -> None:
    length = max(4.0, 1.5 * size_px)
    tip = np.array(_random_point(rng, canvas, 0), dtype=float)
    angle = rng.uniform(0, 2 * np.pi)
    tail = tip - length * np.array([np.cos(angle), np.sin(angle)])
    cv2.arrowedLine(
        canvas,
        (int(round(tail[0])), int(round(tail[1]))),
        (int(round(tip[0])), int(round(tip[1]))),
        255,
        thickness,
        cv2.LINE_8,
        tipLength=float(rng.uniform(0.3, 0.5)),
    )


def _paint_text(canvas: np.ndarray, rng: np.random.Generator, size_px: float, thickness: int) -> None:
    height, width = canvas.shape
    if rng.random() < 0.4:
        text = f"{rng.uniform(0.5, 5.0):.1f} cm"
    else:
        text = TEXT_LABELS[int(rng.integers(len(TEXT_LABELS)))]
    font = (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX)[int(rng.integers(3))]
    (unit_width, unit_height), _ = cv2.getTextSize(text, font, 1.0, thickness)
    # Shrink long strings so they fit the width; the glyph height follows size_px otherwise.
    scale = min(size_px / unit_height, 0.95 * width / unit_width)
    (text_width, text_height), baseline = cv2.getTextSize(text, font, scale, thickness)
    x = rng.uniform(0, max(0, width - text_width))
    y = rng.uniform(min(text_height, height - 1), max(text_height, height - 1 - baseline))
    cv2.putText(canvas, text, (int(round(x)), int(round(y))), font, scale, 255, thickness, cv2.LINE_8)


def _paint_scale_bar(canvas: np.ndarray, rng: np.random.Generator, size_px: float, thickness: int) -> None:
    """A depth/distance ruler along one image edge: a bar with evenly spaced ticks."""
    height, width = canvas.shape
    edge = ("left", "right", "top", "bottom")[int(rng.integers(4))]
    along = height if edge in ("left", "right") else width
    across = width if edge in ("left", "right") else height
    length = rng.uniform(0.3, 0.9) * along
    start = rng.uniform(0, along - length)
    inset = float(rng.uniform(1, max(1.0, 0.03 * across)))
    position = inset if edge in ("left", "top") else across - 1 - inset
    # Ticks point into the image, away from the edge the bar hugs.
    inward = 1 if edge in ("left", "top") else -1
    tick = max(2.0, size_px / 2)
    tick_count = int(rng.integers(5, 11))

    def to_xy(along_coordinate: float, across_coordinate: float) -> tuple[int, int]:
        if edge in ("left", "right"):
            return int(round(across_coordinate)), int(round(along_coordinate))
        return int(round(along_coordinate)), int(round(across_coordinate))

    cv2.line(canvas, to_xy(start, position), to_xy(start + length, position), 255, thickness, cv2.LINE_8)
    for index, coordinate in enumerate(np.linspace(start, start + length, tick_count)):
        # Every fifth tick is a major tick, as on scanner depth rulers.
        reach = tick * (1.6 if index % 5 == 0 else 1.0)
        cv2.line(
            canvas,
            to_xy(coordinate, position),
            to_xy(coordinate, position + inward * reach),
            255,
            thickness,
            cv2.LINE_8,
        )


MARKER_PAINTERS: dict[str, Callable[[np.ndarray, np.random.Generator, float, int], None]] = {
    "cross_plus": _paint_cross_plus,
    "cross_x": _paint_cross_x,
    "caliper_line": _paint_caliper_line,
    "circle": _paint_circle,
    "arrow": _paint_arrow,
    "text": _paint_text,
    "scale_bar": _paint_scale_bar,
}


class MarkerInsertion(A.ImageOnlyTransform):
    """Albumentations transform that burns random markers into uint8 images.

    Works on (H, W) and (H, W, C) uint8 images; place it before ``Normalize``. The draw
    comes from the transform's own ``random_generator``, which ``A.Compose(seed=...)``
    seeds, so a seeded pipeline is reproducible and every call draws new markers.
    ``config`` may be a :class:`MarkerConfig` or a plain dict of its fields (YAML).
    """

    class InitSchema(BaseTransformInitSchema):
        # Typed as Any on purpose: albumentations rebuilds the init kwargs with pydantic's
        # ``model_dump()``, which would turn a MarkerConfig dataclass into a dict.
        config: Any = None

    def __init__(self, config: MarkerConfig | dict[str, Any] | None = None, p: float = 0.5):
        super().__init__(p=p)
        if isinstance(config, dict):
            config = MarkerConfig(**config)
        self.config = config or MarkerConfig()

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        values, mask = sample_marker_layer(params["shape"], self.random_generator, self.config)
        return {"marker_values": values, "marker_mask": mask}

    def apply(self, img: np.ndarray, marker_values: np.ndarray, marker_mask: np.ndarray, **params: Any) -> np.ndarray:
        if img.dtype != np.uint8:
            raise TypeError(f"MarkerInsertion expects uint8 images (place it before Normalize), got {img.dtype}")
        marked = img.copy()
        if img.ndim == 3:
            marked[marker_mask] = marker_values[marker_mask][:, None]
        else:
            marked[marker_mask] = marker_values[marker_mask]
        return marked


def inject_markers_into_batch(
    images: torch.Tensor,
    rng: np.random.Generator,
    config: MarkerConfig | None = None,
    mean: float = 0.5,
    std: float = 0.25,
    probability: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Burn markers into a normalised (B, 1, H, W) batch; return ``(marked, masks)``.

    Each image is marked with ``probability`` and gets its own draw from ``rng``. Drawing
    happens on the uint8 image recovered as ``round((x * std + mean) * 255)``; marker
    pixels are renormalised with ``(v / 255 - mean) / std``. Pixels outside the (B, 1, H,
    W) bool mask are copied from ``images`` bit for bit, never round-tripped through uint8.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected a (B, 1, H, W) batch, got {tuple(images.shape)}")
    pixels = ((images.detach().float().cpu() * std + mean) * 255.0).round().clamp(0, 255)
    pixels = pixels.to(torch.uint8).numpy()
    values = np.zeros(pixels.shape, dtype=np.uint8)
    masks = np.zeros(pixels.shape, dtype=bool)
    for index in range(pixels.shape[0]):
        if rng.random() >= probability:
            continue
        marked, mask = draw_markers(pixels[index, 0], rng, config)
        values[index, 0] = marked
        masks[index, 0] = mask
    mask_tensor = torch.from_numpy(masks).to(images.device)
    marker_values = (torch.from_numpy(values).to(images.device, images.dtype) / 255.0 - mean) / std
    return torch.where(mask_tensor, marker_values, images), mask_tensor
