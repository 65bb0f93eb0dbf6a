"""Torch datasets over manifests and image folders, with an in-memory decoded-image cache.

A sample is a dict: ``image`` (tensor, or a list of tensors when the transform makes several
views), ``sample_id`` (str), ``label`` (int, -1 if unlabelled), ``organ`` (int, -1 if
unknown), ``patient_id`` (str) and ``index`` (row position). Sample ids travel with every
batch so callbacks (the per-sample loss recorder) can name what they saw.
"""

from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from tus.data.images import read_grayscale

Transform = Callable[[np.ndarray], torch.Tensor | Sequence[torch.Tensor]]


def resize_square(image: np.ndarray, size: int | None) -> np.ndarray:
    """Resize to size x size (the reference resizes screenshots to a square input)."""
    if size is None or image.shape == (size, size):
        return image
    interpolation = cv2.INTER_AREA if min(image.shape) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


class DecodedImageCache:
    """Decode every image once (resized to ``size``) and keep it in memory if it fits.

    With ``max_bytes`` exceeded the cache is disabled and images are decoded per access;
    the decision is made up front from the image count so an epoch never half-caches.
    DataLoader workers fork after :meth:`preload`, so they share the arrays copy-on-write.
    """

    def __init__(self, paths: Sequence[str], size: int | None, max_bytes: int = 4 << 30):
        self.paths = list(paths)
        self.size = size
        expected = len(self.paths) * (size * size if size else 512 * 512)
        self.enabled = expected <= max_bytes
        self._arrays: list[np.ndarray] | None = None

    def preload(self) -> None:
        if self.enabled and self._arrays is None:
            self._arrays = [resize_square(read_grayscale(p), self.size) for p in self.paths]

    def __getitem__(self, index: int) -> np.ndarray:
        if self._arrays is not None:
            return self._arrays[index]
        return resize_square(read_grayscale(self.paths[index]), self.size)

    def __len__(self) -> int:
        return len(self.paths)


class ManifestDataset(Dataset):
    """Images of a manifest frame (see :mod:`tus.data.manifest`) through a transform."""

    def __init__(
        self,
        frame: pd.DataFrame,
        transform: Transform,
        *,
        image_size: int | None = None,
        organ_index: dict[str, int] | None = None,
        cache: bool = True,
    ):
        self.frame = frame.reset_index(drop=True)
        self.transform = transform
        self.images = DecodedImageCache(self.frame["abs_path"].tolist(), image_size)
        if cache:
            self.images.preload()
        self.sample_ids = self.frame["sample_id"].astype(str).tolist()
        self.patient_ids = self.frame["patient_id"].astype(str).tolist() if "patient_id" in self.frame else self.sample_ids
        self.labels = (
            self.frame["label"].astype(int).to_numpy() if "label" in self.frame else np.full(len(self.frame), -1)
        )
        if organ_index is not None and "organ" in self.frame:
            unknown = sorted(set(self.frame["organ"]) - set(organ_index) - {""})
            if unknown:
                raise ValueError(f"organ(s) {unknown} not in the organ classes {sorted(organ_index)}")
            # An empty organ stays -1 (unknown): the organ loss ignores it.
            self.organs = self.frame["organ"].map(organ_index).fillna(-1).astype(int).to_numpy()
        else:
            self.organs = np.full(len(self.frame), -1)

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, index: int) -> dict:
        return {
            "image": self.transform(self.images[index]),
            "sample_id": self.sample_ids[index],
            "label": int(self.labels[index]),
            "organ": int(self.organs[index]),
            "patient_id": self.patient_ids[index],
            "index": index,
        }
