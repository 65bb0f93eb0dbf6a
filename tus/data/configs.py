"""The data configs of fine-tuning (labelled manifests, augmentation, markers) and the image
sources of the unlabelled pools, without importing torch, albumentations or OpenCV: the CLI
builds and prints configs from these (``--help``, ``--print_config``) before any stage loads.
The modules that use them (:mod:`tus.data.datamodules`, :mod:`tus.data.transforms`,
:mod:`tus.data.markers`) re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tus.config import ConfigError, require_at_least, require_seeds

# How a multi-frame DICOM (a cine loop) becomes manifest rows (tus.data.manifest): every frame,
# the first, the middle one (the default), or a frame index from 0.
DICOM_FRAME_CHOICES = ("all", "first", "middle")


def check_dicom_frames(value: str | int, option: str = "data.dicom_frames") -> str:
    """``value`` as a valid ``dicom_frames`` choice (all, first, middle, or a frame index >= 0)."""
    text = str(value).strip().lower()
    if text in DICOM_FRAME_CHOICES or (text.isdigit() and int(text) >= 0):
        return text
    raise ConfigError(f"{option} must be one of {list(DICOM_FRAME_CHOICES)} or a frame index >= 0, got {value!r}")


MARKER_TYPES = ("cross_plus", "cross_x", "caliper_line", "circle", "arrow", "text", "scale_bar")


@dataclass(frozen=True)
class MarkerConfig:
    """What :func:`tus.data.markers.draw_markers` may draw.

    ``size_range`` is a fraction of the image's shorter side (the arm of a cross, the
    radius of a circle, the height of text); ``intensity_range`` and ``thickness_range``
    are inclusive integer ranges (gray level, pixels).
    """

    types: tuple[str, ...] = MARKER_TYPES
    min_count: int = 1
    max_count: int = 4
    size_range: tuple[float, float] = (0.04, 0.12)
    intensity_range: tuple[int, int] = (200, 255)
    thickness_range: tuple[int, int] = (1, 2)

    def __post_init__(self) -> None:
        # Configs often come from YAML, where tuples arrive as lists; freeze them so the
        # config stays hashable and comparable.
        for name in ("types", "size_range", "intensity_range", "thickness_range"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = sorted(set(self.types) - set(MARKER_TYPES))
        if not self.types or unknown:
            raise ValueError(f"marker types must be a non-empty subset of {MARKER_TYPES}, got {self.types}")
        if not 0 <= self.min_count <= self.max_count:
            raise ValueError(f"need 0 <= min_count <= max_count, got {self.min_count}, {self.max_count}")
        low, high = self.size_range
        if not 0 < low <= high <= 1:
            raise ValueError(f"size_range must satisfy 0 < low <= high <= 1, got {self.size_range}")
        low, high = self.intensity_range
        if not 0 <= low <= high <= 255:
            raise ValueError(f"intensity_range must lie in 0..255, got {self.intensity_range}")
        low, high = self.thickness_range
        if not 1 <= low <= high:
            raise ValueError(f"thickness_range must satisfy 1 <= low <= high, got {self.thickness_range}")


@dataclass
class AugmentConfig:
    """Fine-tuning augmentations: rotation, horizontal flip, small shifts, marker insertion."""

    rotate_limit: float = 15.0
    shift_limit: float = 0.05
    hflip_p: float = 0.5
    affine_p: float = 0.8
    markers_p: float = 0.5
    markers: MarkerConfig = field(default_factory=MarkerConfig)


@dataclass
class SyntheticDataConfig:
    """Generated, labelled images added to the training folds only (``data.synthetic``; tus.data.synthetic).

    ``source``: a ``tus sample --label/--labels-from`` folder, a ``tus filter --per-class`` folder, or
    their ``manifest.csv``; ``{fold}`` and ``{seed}`` are replaced per run, so each fold can read the
    samples of a generator that never saw its test patients (the fine-tuning refuses any other).
    ``per_class``: this many images of each class; ``ratio``: per class, this many per real training
    image of the class; neither: every image. ``only``: train on the synthetic images alone (the
    test fold stays real). ``allow_unexcluded``: accept samples whose generator records no
    exclusion of the test patients (the reference's protocol: its generator saw every fold).
    """

    source: str | None = None
    per_class: int | None = None
    ratio: float | None = None
    only: bool = False
    allow_unexcluded: bool = False

    def __post_init__(self) -> None:
        if self.per_class is not None and self.ratio is not None:
            raise ConfigError("data.synthetic: give per_class or ratio, not both")
        if self.per_class is not None and self.per_class < 1:
            raise ConfigError(f"data.synthetic.per_class must be >= 1, got {self.per_class}")
        if self.ratio is not None and not self.ratio > 0:
            raise ConfigError(f"data.synthetic.ratio must be > 0, got {self.ratio}")


@dataclass
class LabeledDataConfig:
    manifest: str = ""
    image_size: int = 224
    num_folds: int = 3
    fold_seed: int = 0
    # False: one split (by fold_seed) shared by every seed, so seeds differ only in training
    # randomness. True: the folds are re-drawn for each seed (the reference code), so the
    # spread over seeds includes the split's; folds.csv then has a seed column.
    folds_per_seed: bool = False
    # A folds.csv (sample_id, fold[, seed]) whose folds this CV reuses instead of drawing its
    # own: an arm that drops or relabels rows of a labelled set is then tested on the same
    # patients as the arm on the whole set (studies set it; num_folds/fold_seed are then unused).
    folds_from: str | None = None
    batch_size: int = 64
    eval_batch_size: int = 128
    num_workers: int = 2
    weighted_sampler: bool = True
    # Decoded, resized images on disk, shared by every fold x seed and later runs (see
    # tus.data.cache); None: $TUS_CACHE_DIR/images, else ~/.cache/tus/images.
    cache_images: bool = True
    cache_dir: str | None = None
    # Share of the training patients held out for model selection when selection=inner_val.
    inner_val_fraction: float = 0.2
    # Multi-frame DICOMs (cine loops): all (one row per frame, sample_id "<id>#frame<k>", the
    # patient shared), first, middle, or a frame index from 0. Single images are unaffected.
    dicom_frames: str = "middle"
    # The K >= 2 class names, index = label (the manifest's labels are these names or 0..K-1).
    # None: binary 0/1 labels, or, when the manifest's labels are names, the names found (sorted),
    # which the run then records in its config.yaml.
    label_names: list[str] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Generated labelled images for the training folds only (never a test fold or inner validation).
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)

    def __post_init__(self) -> None:
        self.dicom_frames = check_dicom_frames(self.dicom_frames)
        if self.label_names is not None:
            self.label_names = [str(name).strip() for name in self.label_names]
            if len(self.label_names) < 2 or len(set(self.label_names)) != len(self.label_names) or "" in self.label_names:
                raise ConfigError(f"data.label_names must name at least 2 distinct, non-empty classes, got {self.label_names}")
        require_at_least(self, "data.", 1, "image_size", "batch_size", "eval_batch_size")
        require_at_least(self, "data.", 2, "num_folds")
        require_seeds("data.fold_seed", self.fold_seed)
        require_at_least(self, "data.", 0, "num_workers")
        if not 0 < self.inner_val_fraction < 1:
            raise ConfigError(f"data.inner_val_fraction must be in (0, 1), got {self.inner_val_fraction}")


@dataclass
class ImageSourceConfig:
    """One source of the unlabelled pool: a manifest, or a folder of images (e.g. synthetic).

    ``organ`` labels every image of a folder source (or fills a manifest's missing organs).
    ``weight`` is the source's share of the draws, regardless of its size.
    """

    manifest: str | None = None
    folder: str | None = None
    organ: str | None = None
    weight: float = 1.0
    # A manifest's multi-frame DICOMs (see LabeledDataConfig.dicom_frames).
    dicom_frames: str = "middle"

    def __post_init__(self) -> None:
        self.dicom_frames = check_dicom_frames(self.dicom_frames, "dicom_frames")
