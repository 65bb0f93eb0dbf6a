"""A generated stand-in for the TesticulUS data: B-mode-like phantoms, no download.

The labeled set mimics the LD (testicles, per-patient homogeneous/inhomogeneous labels,
about 20% positive, several images per patient, burned-in markers on some frames, optional
injected label noise); the unlabeled pool mimics the UD (testicle and thyroid scans).

Image model, per pixel: an echogenicity map (organ, surrounding tissue, capsule, lesions)
times fully developed speckle (the envelope of PSF-filtered complex Gaussian scatterers,
hence Rayleigh distributed), times a depth gain (attenuation partly compensated by TGC),
plus an electronic noise floor, log-compressed to 8 bits over a fixed dynamic range.
Inhomogeneity is added in the log domain and the organ's log-echogenicity mean is then
restored, so the classes differ in texture, not in mean organ brightness.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from tus.data.images import write_dicom, write_grayscale
from tus.data.markers import draw_markers
from tus.data.outputs import claim_output, staged_folder

ORGANS = ("testicle", "thyroid")
CLASS_NAMES = ("homogeneous", "inhomogeneous")
# The 3-class phantom (classes=3): no lesion, focal lesions (patches), diffuse change (striations).
MULTICLASS_NAMES = ("homogeneous", "focal_lesion", "diffuse")
# The inhomogeneity pattern (PatientTraits.pattern) that each class > 0 of the 3-class phantom draws.
MULTICLASS_PATTERNS = {1: 0, 2: 1}

DYNAMIC_RANGE_DB = 50.0
# Log-compression reference: the organ (unit echogenicity) lands around gray level 125.
REFERENCE_DB = 22.0
NOISE_FLOOR_DB = -32.0

# Seed-stream tags, so labeled images, pool images, patients, markers and label noise draw
# from independent generators: changing pool_size does not change the labeled images.
LABELED_STREAM, POOL_STREAM, ASSIGNMENT_STREAM, NOISE_STREAM = 1, 2, 3, 4
LABELED_PATIENT_STREAM, POOL_PATIENT_STREAM = 5, 6
# With dicom=True every CINE_EVERY-th patient's views are one multi-frame DICOM (a cine loop).
CINE_EVERY = 5
# The synthetic PatientName written into phantom DICOMs: tests grep outputs for it.
PHANTOM_PATIENT_NAME = "Phantomname^Never^Shown"


@dataclass(frozen=True)
class PatientTraits:
    """What one patient's images share: the probe, the organ's size and shape, the gain
    setting and the kind of inhomogeneity. Images of a patient look alike, as in a real
    exam, so a split that ignores patients leaks (the reason tus splits by patient)."""

    fan_probe: bool
    organ_scale: float
    aspect: float
    pattern: int  # inhomogeneity: 0 patches, 1 striations, 2 both
    gain_db: float


def sample_patient_traits(rng: np.random.Generator) -> PatientTraits:
    return PatientTraits(
        fan_probe=bool(rng.random() < 0.4),
        organ_scale=float(rng.uniform(0.85, 1.15)),
        aspect=float(rng.uniform(0.55, 0.8)),
        pattern=int(rng.integers(3)),
        gain_db=float(rng.uniform(-1.5, 1.5)),
    )


@dataclass(frozen=True)
class PhantomPaths:
    root: Path
    labeled_manifest: Path
    unlabeled_manifest: Path


def generate_phantom(
    out_dir: str | Path,
    *,
    num_patients: int = 60,
    images_per_patient: tuple[int, int] = (2, 5),
    image_size: int = 128,
    positive_fraction: float = 0.2,
    marker_fraction: float = 0.3,
    pool_size: int = 300,
    seed: int = 0,
    label_noise: float = 0.0,
    dicom: bool = False,
    classes: int = 2,
) -> PhantomPaths:
    """Write the labeled and unlabeled phantom datasets under ``out_dir``.

    ``dicom=True`` writes the labelled images as DICOM instead (the same pixels, uncompressed,
    PatientName ``PHANTOM_PATIENT_NAME``): one single-frame file per image, except every
    ``CINE_EVERY``-th patient, whose views form one multi-frame file (its manifest row loads as
    the middle frame by default, as every frame with ``data.dicom_frames: all``). That manifest's
    ``patient_id`` and ``organ`` read ``from_dicom``. The pool stays PNG.

    ``images_per_patient`` is an inclusive range. Exactly ``round(positive_fraction *
    num_patients)`` patients are inhomogeneous, and exactly ``round(label_noise * N)`` of
    the N labeled images get their label flipped (``clean_label`` keeps the truth).

    ``classes=3`` labels patients homogeneous (0), focal lesion (1: hypo/hyperechoic patches) or
    diffuse (2: striations), ``class_name`` naming them: ``round(positive_fraction * N)`` patients
    are lesioned, split as evenly as possible between 1 and 2 (focal first); a noisy label becomes
    one of the two other classes at random. ``classes=2`` (the default) writes exactly the binary
    phantom it always did.
    """
    if classes not in (2, 3):
        raise ValueError(f"classes must be 2 or 3, got {classes}")
    low, high = images_per_patient
    if not 1 <= low <= high:
        raise ValueError(f"images_per_patient must be 1 <= low <= high, got {images_per_patient}")
    for name, value in (("positive_fraction", positive_fraction), ("marker_fraction", marker_fraction), ("label_noise", label_noise)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    root = Path(out_dir)
    # Like every --out: a new or empty folder (an existing dataset is never overwritten or mixed
    # with new images), written aside and renamed into place when complete.
    with claim_output(root, "--out"):
        with staged_folder(root) as staging:
            _write_phantom(staging, num_patients, low, high, image_size, positive_fraction, marker_fraction, pool_size, seed, label_noise, dicom, classes)
    return PhantomPaths(root, root / "labeled" / "manifest.csv", root / "unlabeled" / "manifest.csv")


def _write_phantom(
    root: Path,
    num_patients: int,
    low: int,
    high: int,
    image_size: int,
    positive_fraction: float,
    marker_fraction: float,
    pool_size: int,
    seed: int,
    label_noise: float,
    dicom: bool = False,
    classes: int = 2,
) -> None:
    assignment = np.random.default_rng([seed, ASSIGNMENT_STREAM])

    # In permutation order, the first lesioned patients alternate focal / diffuse (3 classes).
    lesioned = assignment.permutation(num_patients)[: round(positive_fraction * num_patients)].tolist()
    patient_class = {patient: 1 if classes == 2 else 1 + rank % 2 for rank, patient in enumerate(lesioned)}
    labeled_rows = []
    for patient in range(num_patients):
        clean_label = patient_class.get(patient, 0)
        traits = sample_patient_traits(np.random.default_rng([seed, LABELED_PATIENT_STREAM, patient]))
        if classes > 2 and clean_label:
            traits = replace(traits, pattern=MULTICLASS_PATTERNS[clean_label])
        for view in range(int(assignment.integers(low, high + 1))):
            labeled_rows.append(
                {
                    "path": f"images/P{patient:04d}_{view:02d}.png",
                    "patient_id": f"P{patient:04d}",
                    "clean_label": clean_label,
                    "organ": "testicle",
                    "traits": traits,
                }
            )
    labeled = _render_rows(root / "labeled", labeled_rows, [seed, LABELED_STREAM], image_size, marker_fraction)
    noise_rng = np.random.default_rng([seed, NOISE_STREAM])
    flipped = noise_rng.choice(len(labeled), size=round(label_noise * len(labeled)), replace=False)
    labeled["label"] = labeled["clean_label"]
    if classes == 2:
        labeled.loc[flipped, "label"] = 1 - labeled.loc[flipped, "clean_label"]
    else:  # one of the other classes, drawn after the flipped rows (the binary draws stay as they were)
        labeled.loc[flipped, "label"] = (labeled.loc[flipped, "clean_label"] + noise_rng.integers(1, classes, size=len(flipped))) % classes
    names = CLASS_NAMES if classes == 2 else MULTICLASS_NAMES
    labeled["class_name"] = [names[label] for label in labeled["label"]]
    labeled["sample_id"] = labeled["path"]
    labeled = labeled[["path", "patient_id", "label", "class_name", "organ", "has_markers", "clean_label", "sample_id"]]
    if dicom:
        labeled = _as_dicom(root / "labeled", labeled)
    labeled.to_csv(root / "labeled" / "manifest.csv", index=False)

    pool_rows = []
    pool_patient = 0
    first_organ = int(assignment.integers(2))
    while len(pool_rows) < pool_size:
        count = int(assignment.integers(low, high + 1))
        # Alternate organs by patient (random start) so both are present and balanced.
        organ = ORGANS[(first_organ + pool_patient) % 2]
        traits = sample_patient_traits(np.random.default_rng([seed, POOL_PATIENT_STREAM, pool_patient]))
        # Pool scans are inhomogeneous at the labeled rate; that truth is not written out.
        inhomogeneous = int(assignment.random() < positive_fraction)
        for view in range(min(count, pool_size - len(pool_rows))):
            pool_rows.append(
                {
                    "path": f"images/U{pool_patient:04d}_{view:02d}.png",
                    "patient_id": f"U{pool_patient:04d}",
                    "clean_label": inhomogeneous,
                    "organ": organ,
                    "traits": traits,
                }
            )
        pool_patient += 1
    pool = _render_rows(root / "unlabeled", pool_rows, [seed, POOL_STREAM], image_size, marker_fraction)
    pool["sample_id"] = pool["path"]
    pool = pool[["path", "patient_id", "organ", "sample_id"]]
    pool.to_csv(root / "unlabeled" / "manifest.csv", index=False)


def _as_dicom(folder: Path, labeled: pd.DataFrame) -> pd.DataFrame:
    """Rewrite the labelled PNGs as DICOMs (removing the PNGs) and return the DICOM manifest."""
    from tus.data.images import read_grayscale

    rows = []
    for number, (patient, group) in enumerate(labeled.groupby("patient_id", sort=True)):
        images = [read_grayscale(folder / path) for path in group["path"]]
        first = group.iloc[0].to_dict()
        if number % CINE_EVERY == CINE_EVERY - 1 and len(images) > 1:
            path = f"images/{patient}_cine.dcm"
            write_dicom(folder / path, np.stack(images), patient_id=str(patient), patient_name=PHANTOM_PATIENT_NAME, body_part="TESTIS")
            # A loop's frames share the patient's label; has_markers: any frame has them.
            rows.append({**first, "path": path, "sample_id": path, "has_markers": int(group["has_markers"].max())})
        else:
            for record, image in zip(group.to_dict("records"), images):
                path = str(Path(record["path"]).with_suffix(".dcm"))
                write_dicom(folder / path, image, patient_id=str(patient), patient_name=PHANTOM_PATIENT_NAME, body_part="TESTIS")
                rows.append({**record, "path": path, "sample_id": path})
        for png in group["path"]:
            (folder / png).unlink()
    frame = pd.DataFrame(rows, columns=labeled.columns)
    frame["patient_id"] = "from_dicom"
    frame["organ"] = "from_dicom"
    return frame


def _render_rows(folder: Path, rows: list[dict], stream: list[int], image_size: int, marker_fraction: float) -> pd.DataFrame:
    """Render and write one image per row; each image has its own seeded generator."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for index, row in enumerate(rows):
        rng = np.random.default_rng([*stream, index])
        image = render_bmode(rng, image_size, row["organ"], bool(row["clean_label"]), row.pop("traits"))
        row["has_markers"] = int(rng.random() < marker_fraction)
        if row["has_markers"]:
            image, _ = draw_markers(image, rng)
        write_grayscale(folder / row["path"], image)
    # Named columns keep an empty set (pool_size=0) a valid, empty manifest.
    return pd.DataFrame(rows, columns=["path", "patient_id", "clean_label", "organ", "has_markers"])


def render_bmode(rng: np.random.Generator, size: int, organ: str, inhomogeneous: bool, traits: PatientTraits | None = None) -> np.ndarray:
    """A (size, size) uint8 B-mode-like image of a testicle or thyroid."""
    image, _ = render_bmode_with_mask(rng, size, organ, inhomogeneous, traits)
    return image


def render_bmode_with_mask(rng: np.random.Generator, size: int, organ: str, inhomogeneous: bool, traits: PatientTraits | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`render_bmode`, also returning the (size, size) bool organ mask.

    The mask is the parenchyma (both lobes and the isthmus for a thyroid), the region
    whose texture carries the label: tests and attention maps can be scored against it.
    ``traits`` (drawn from ``rng`` when None) fixes what a patient's images share; organ
    position, rotation, lesions and speckle still vary per image.
    """
    if organ not in ORGANS:
        raise ValueError(f"organ must be one of {ORGANS}, got {organ!r}")
    traits = traits or sample_patient_traits(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    field_of_view, depth = _field_of_view(rng, size, xx, yy, traits.fan_probe)

    # Log-echogenicity in dB, built as: surrounding tissue, then the organ.
    tissue_db = -10.0 + 2.0 * _smooth_noise(rng, size, sigma=size / 10)
    if organ == "testicle":
        organ_mask, capsule = _testicle(rng, size, xx, yy, traits)
        echo_db = np.where(organ_mask, 0.0, tissue_db)
        echo_db = np.where(capsule, 6.0, echo_db)
    else:
        organ_mask, echo_db = _thyroid(rng, size, xx, yy, tissue_db, traits.organ_scale)
    if inhomogeneous:
        lesion_db = _inhomogeneity(rng, size, xx, yy, organ_mask, traits.pattern)
        # Keep the organ's mean log-echogenicity: the class must not be readable from
        # brightness alone.
        lesion_db = lesion_db - lesion_db[organ_mask].mean()
        echo_db = echo_db + np.where(organ_mask, lesion_db, 0.0)
    skin_depth = rng.uniform(0.01, 0.03) * size
    echo_db = echo_db + 10.0 * np.exp(-0.5 * ((depth - skin_depth) / max(1.0, 0.008 * size)) ** 2)

    # Attenuation ~1 dB per 1% of depth, 75-90% compensated by time-gain compensation.
    attenuation_db = -rng.uniform(25.0, 35.0) * (depth / size) * (1.0 - rng.uniform(0.75, 0.9))
    gain_db = traits.gain_db + rng.uniform(-0.5, 0.5)
    psf_sigma = (0.6 * size / 128, 1.1 * size / 128)
    amplitude = 10.0 ** ((echo_db + attenuation_db + gain_db) / 20.0) * _rayleigh_envelope(rng, size, psf_sigma)
    amplitude = np.hypot(amplitude, 10.0 ** (NOISE_FLOOR_DB / 20.0) * _rayleigh_envelope(rng, size, None))
    decibels = 20.0 * np.log10(amplitude + 1e-12)
    gray = (decibels - (REFERENCE_DB - DYNAMIC_RANGE_DB)) * (255.0 / DYNAMIC_RANGE_DB)
    gray = np.where(field_of_view, np.clip(np.round(gray), 0, 255), 0)
    return gray.astype(np.uint8), organ_mask & field_of_view


def _field_of_view(rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray, fan_probe: bool) -> tuple[np.ndarray, np.ndarray]:
    """A curvilinear fan or a linear-probe rectangle; returns (mask, depth in pixels)."""
    if not fan_probe:
        x0, x1 = rng.uniform(0.03, 0.1) * size, rng.uniform(0.9, 0.97) * size
        y0, y1 = rng.uniform(0.03, 0.1) * size, rng.uniform(0.92, 0.99) * size
        mask = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
        return mask, np.maximum(yy - y0, 0.0)
    apex_x = size / 2 + rng.uniform(-0.03, 0.03) * size
    apex_y = -rng.uniform(0.2, 0.5) * size
    inner = -apex_y + rng.uniform(0.02, 0.08) * size
    outer = -apex_y + rng.uniform(0.9, 0.98) * size
    radius = np.hypot(xx - apex_x, yy - apex_y)
    angle = np.arctan2(xx - apex_x, yy - apex_y)
    half_angle = np.arctan2(rng.uniform(0.42, 0.48) * size, -apex_y + 0.5 * size)
    mask = (radius >= inner) & (radius <= outer) & (np.abs(angle) <= half_angle)
    return mask, np.maximum(radius - inner, 0.0)


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, theta: float) -> np.ndarray:
    """Normalised elliptic radius: < 1 inside the ellipse, 1 on its border."""
    cos, sin = np.cos(theta), np.sin(theta)
    u = (xx - cx) * cos + (yy - cy) * sin
    v = -(xx - cx) * sin + (yy - cy) * cos
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _testicle(rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray, traits: PatientTraits) -> tuple[np.ndarray, np.ndarray]:
    """One tilted ellipse and its bright capsule (tunica albuginea) ring, as two masks."""
    # The patient fixes the organ's size and shape; probe pressure and plane jitter them.
    a = traits.organ_scale * rng.uniform(0.31, 0.34) * size
    b = a * traits.aspect * rng.uniform(0.93, 1.07)
    cx = size / 2 + rng.uniform(-0.08, 0.08) * size
    cy = size / 2 + rng.uniform(-0.05, 0.08) * size
    radius = _ellipse(xx, yy, cx, cy, a, b, rng.uniform(-0.5, 0.5))
    # A band about 2% of the image thick, straddling the border (radius 1).
    capsule = np.abs(radius - 1.0) * b < max(0.8, 0.01 * size)
    return radius < 1.0 - max(0.8, 0.01 * size) / b, capsule


def _thyroid(rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray, tissue_db: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Two lobes joined by an isthmus over a trachea, carotids beside the lobes.

    Returns (parenchyma mask, log-echogenicity in dB).
    """
    center_x = size / 2 + rng.uniform(-0.04, 0.04) * size
    lobe_y = rng.uniform(0.42, 0.5) * size
    spread = rng.uniform(0.17, 0.21) * size
    lobe_a, lobe_b = scale * rng.uniform(0.11, 0.14) * size, scale * rng.uniform(0.09, 0.12) * size
    lobes = np.zeros_like(xx, dtype=bool)
    for side in (-1, 1):
        lobes |= _ellipse(xx, yy, center_x + side * spread, lobe_y, lobe_a, lobe_b, side * rng.uniform(0.0, 0.4)) < 1
    trachea_radius = rng.uniform(0.08, 0.1) * size
    trachea_y = lobe_y + rng.uniform(0.03, 0.06) * size
    trachea_distance = np.hypot(xx - center_x, yy - trachea_y)
    # Air reflects everything: behind the anterior tracheal wall there is only shadow.
    air = (trachea_distance < trachea_radius) | ((yy > trachea_y) & (np.abs(xx - center_x) < trachea_radius))
    isthmus_top = trachea_y - trachea_radius - rng.uniform(0.05, 0.07) * size
    isthmus = (np.abs(xx - center_x) < spread) & (yy > isthmus_top) & (yy < trachea_y)
    organ_mask = (lobes | isthmus) & ~air

    echo_db = np.where(organ_mask, 0.0, tissue_db)
    # Strap muscles: a hypoechoic band above the gland.
    muscle = (yy > isthmus_top - 0.08 * size) & (yy < isthmus_top - 0.02 * size) & ~organ_mask
    echo_db = np.where(muscle, -14.0, echo_db)
    echo_db = np.where(air, -30.0, echo_db)
    anterior_wall = (np.abs(trachea_distance - trachea_radius) < max(1.0, 0.012 * size)) & (yy < trachea_y)
    echo_db = np.where(anterior_wall, 12.0, echo_db)
    for side in (-1, 1):
        carotid_x = center_x + side * (spread + lobe_a + rng.uniform(0.03, 0.05) * size)
        carotid = np.hypot(xx - carotid_x, yy - lobe_y - 0.04 * size)
        echo_db = np.where(carotid < rng.uniform(0.05, 0.07) * size, -28.0, echo_db)
    return organ_mask, echo_db


def _inhomogeneity(rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray, organ_mask: np.ndarray, pattern: int) -> np.ndarray:
    """Log-echogenicity changes inside the organ: hypo/hyperechoic patches (pattern 0),
    striations (1), or both (2)."""
    lesion_db = np.zeros_like(xx)
    inside_y, inside_x = np.nonzero(organ_mask)
    if pattern in (0, 2):
        for _ in range(int(rng.integers(3, 7))):
            pick = int(rng.integers(len(inside_x)))
            radius = _ellipse(xx, yy, inside_x[pick], inside_y[pick], rng.uniform(0.05, 0.1) * size, rng.uniform(0.04, 0.08) * size, rng.uniform(0, np.pi))
            contrast = rng.uniform(-16.0, -10.0) if rng.random() < 0.7 else rng.uniform(8.0, 12.0)
            # Soft edges: real lesions fade into the parenchyma.
            lesion_db += contrast / (1.0 + np.exp((radius - 1.0) * 8.0))
    if pattern in (1, 2):
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(0.08, 0.14) * size
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 1)
        # Wavy rather than ruler-straight bands, as septa are in real parenchyma.
        phase = phase + 0.25 * _smooth_noise(rng, size, sigma=size / 4)
        # Thin hypoechoic bands (about a third of each period): striated parenchyma.
        stripes = np.clip((np.cos(2 * np.pi * phase) - 0.45) / 0.55, 0.0, 1.0)
        lesion_db += -rng.uniform(10.0, 15.0) * stripes
    return lesion_db


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance low-frequency field for slow tissue variations.

    Drawn on a coarse grid and upsampled: same look as blurring a full-size field with a
    wide kernel, at a fraction of the cost.
    """
    coarse_size = max(2, int(round(2 * size / sigma)))
    coarse = rng.standard_normal((coarse_size, coarse_size)).astype(np.float32)
    field = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).astype(np.float64)
    return (field - field.mean()) / (field.std() + 1e-12)


def _rayleigh_envelope(rng: np.random.Generator, size: int, psf_sigma: tuple[float, float] | None) -> np.ndarray:
    """Envelope of complex Gaussian scatterers, optionally filtered by a Gaussian PSF.

    Rayleigh-distributed with unit mean square. With a PSF (``(axial, lateral)`` sigma in
    pixels) it is fully developed speckle, grains elongated laterally as for a real
    transducer; without, white electronic noise.
    """
    scatterers = rng.standard_normal((size, size, 2), dtype=np.float32)
    if psf_sigma is not None:
        axial, lateral = psf_sigma
        scatterers = cv2.GaussianBlur(scatterers, (0, 0), sigmaX=lateral, sigmaY=axial)
    power = (scatterers**2).sum(axis=2, dtype=np.float64)
    return np.sqrt(power / power.mean())
