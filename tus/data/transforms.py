"""Albumentations pipelines for fine-tuning (and the shared normalisation).

Every pipeline maps a (H, W) uint8 image to a (1, H, W) float tensor normalised with
mean 0.5 / std 0.25, as in the reference. Augmentation runs inside ``Dataset.__getitem__``,
so each image gets its own random draw (the reference applied one draw to a whole batch).
Reproducibility: each pipeline is seeded, and DataLoader workers reseed it from their own
torch seed (see :func:`seed_transform_in_worker`).
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

from tus.data.configs import AugmentConfig as AugmentConfig
from tus.data.markers import MarkerInsertion

NORMALIZE_MEAN = 0.5
NORMALIZE_STD = 0.25


class AlbumentationsTransform:
    """Callable wrapper: uint8 (H, W) -> normalised tensor (1, H, W)."""

    def __init__(
        self,
        transforms: list,
        seed: int | None = None,
        *,
        mean: float | Sequence[float] = NORMALIZE_MEAN,
        std: float | Sequence[float] = NORMALIZE_STD,
        channels: int = 1,
    ):
        # ``channels`` > 1 repeats the grey image (a network built for RGB input sees R = G = B).
        self.channels = channels
        self.pipeline = A.Compose(
            [*transforms, A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()],
            seed=seed,
        )

    def reseed(self, seed: int) -> None:
        self.pipeline.set_random_seed(seed)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        stacked = image[..., None] if self.channels == 1 else np.repeat(image[..., None], self.channels, axis=2)
        return self.pipeline(image=stacked)["image"]


def finetune_train_transform(config: AugmentConfig, seed: int | None = None) -> AlbumentationsTransform:
    transforms = [
        A.HorizontalFlip(p=config.hflip_p),
        A.Affine(
            rotate=(-config.rotate_limit, config.rotate_limit),
            translate_percent=(-config.shift_limit, config.shift_limit),
            border_mode=0,
            fill=0,
            p=config.affine_p,
        ),
    ]
    if config.markers_p > 0:
        # Markers go in after the geometric transforms so they keep their crisp shape.
        transforms.append(MarkerInsertion(config=config.markers, p=config.markers_p))
    return AlbumentationsTransform(transforms, seed=seed)


def eval_transform(normalization: dict[str, list[float]] | None = None, channels: int = 1) -> AlbumentationsTransform:
    """No augmentation, only the normalisation: the training default, or an export's ``normalization``
    (``{"mean": [...], "std": [...]}`` per channel, as :mod:`tus.models.export` records it)."""
    if normalization is None:
        return AlbumentationsTransform([], seed=0, channels=channels)
    mean, std = normalization["mean"], normalization["std"]
    return AlbumentationsTransform([], seed=0, mean=mean[0] if len(mean) == 1 else tuple(mean), std=std[0] if len(std) == 1 else tuple(std), channels=channels)


def seed_transform_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give each worker's pipelines a distinct, reproducible seed.

    Without this every worker would hold a copy of the same seeded pipeline and repeat the
    same augmentation sequence.
    """
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    seed = info.seed % (2**32)
    for transform in _transforms_of(info.dataset):
        transform.reseed(seed)


def _transforms_of(dataset) -> list:
    found = []
    transform = getattr(dataset, "transform", None)
    candidates = transform if isinstance(transform, (list, tuple)) else [transform]
    for candidate in candidates:
        if hasattr(candidate, "reseed"):
            found.append(candidate)
    for child in getattr(dataset, "datasets", []):
        found.extend(_transforms_of(child))
    return found
