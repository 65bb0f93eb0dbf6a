"""Two random views per image for contrastive pretraining (SimCLR-style, grayscale).

Each call of :class:`ViewPairTransform` runs one seeded albumentations pipeline twice on the
same (H, W) uint8 image, so the two views and every image of a batch get their own draws
(augmentation happens per item in ``Dataset.__getitem__``, never once per batch). The
pipeline stays single-channel throughout: no colour transforms that expect RGB (saturation,
hue, to-gray), which is where generic SimCLR recipes silently produce 3-channel tensors.

Views are reproducible: the pipeline is seeded, DataLoader workers reseed it through
:func:`tus.data.transforms.seed_transform_in_worker`, and ``rank`` (the DDP rank) is folded
into every seed, since PyTorch gives the workers of every rank the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import albumentations as A
import cv2
import numpy as np
import torch

from tus.data.markers import MarkerConfig, MarkerInsertion
from tus.data.transforms import AlbumentationsTransform

# Spreads (seed, rank) pairs apart so rank r's seeds never coincide with rank 0's nearby seeds.
RANK_SEED_STRIDE = 1_000_003


@dataclass
class ViewConfig:
    """The view augmentations; a probability of 0 switches a transform off.

    ``crop_scale`` is the area fraction of the random resized crop; ``noise_std`` is the
    Gaussian noise standard deviation as a fraction of the 0..255 range; markers (burned-in
    calipers, text...) are inserted after the geometric transforms so they stay crisp, and
    before the photometric ones, which alter them like the rest of the screenshot.
    """

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    hflip_p: float = 0.5
    vflip_p: float = 0.0
    rotate_limit: float = 15.0
    rotate_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    jitter_p: float = 0.8
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: float = 0.5
    noise_std: tuple[float, float] = (0.02, 0.08)
    noise_p: float = 0.5
    markers_p: float = 0.0
    markers: MarkerConfig = field(default_factory=MarkerConfig)


def view_augmentations(config: ViewConfig, image_size: int) -> list:
    """The albumentations transforms of one view (normalisation is added by the wrapper)."""
    transforms = [
        A.RandomResizedCrop(size=(image_size, image_size), scale=config.crop_scale, ratio=config.crop_ratio, p=1.0),
        A.HorizontalFlip(p=config.hflip_p),
        A.VerticalFlip(p=config.vflip_p),
        A.Rotate(limit=config.rotate_limit, border_mode=cv2.BORDER_CONSTANT, fill=0, p=config.rotate_p),
    ]
    if config.markers_p > 0:
        transforms.append(MarkerInsertion(config=config.markers, p=config.markers_p))
    transforms += [
        A.RandomBrightnessContrast(brightness_limit=config.brightness, contrast_limit=config.contrast, p=config.jitter_p),
        A.GaussianBlur(blur_limit=0, sigma_limit=config.blur_sigma, p=config.blur_p),
        A.GaussNoise(std_range=config.noise_std, per_channel=False, p=config.noise_p),
    ]
    return transforms


class ViewPairTransform:
    """uint8 (H, W) image -> ``[view_1, view_2]``, each a normalised (1, S, S) tensor."""

    def __init__(self, config: ViewConfig, image_size: int, seed: int = 0, rank: int = 0):
        self.seed = seed
        self.rank = rank
        self.views = AlbumentationsTransform(view_augmentations(config, image_size), seed=self._stream_seed(seed))

    def _stream_seed(self, seed: int) -> int:
        return (seed + self.rank * RANK_SEED_STRIDE) % (2**32)

    def reseed(self, seed: int) -> None:
        """Restart the draws from ``seed`` (combined with the rank)."""
        self.seed = seed
        self.views.reseed(self._stream_seed(seed))

    def set_rank(self, rank: int) -> None:
        """Give this process (DDP rank) its own stream of draws."""
        self.rank = rank
        self.reseed(self.seed)

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        return [self.views(image), self.views(image)]
