"""Torch datasets over manifests and image folders, reading decoded images from the disk cache.

A sample is a dict: ``image`` (tensor, or a list of tensors when the transform makes several
views), ``sample_id`` (str), ``label`` (int, -1 if unlabelled), ``organ`` (int, -1 if
unknown), ``patient_id`` (str) and ``index`` (row position). Sample ids travel with every
batch so callbacks (the per-sample loss recorder) can name what they saw.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from tus.data.cache import CachedImages, cached_images, resize_square
from tus.data.images import read_grayscale

Transform = Callable[[np.ndarray], torch.Tensor | Sequence[torch.Tensor]]


class DecodedImages:
    """Decode (and resize) each image on access: the path for ``cache=False`` or ``size=None``."""

    def __init__(self, paths: Sequence[str], size: int | None):
        self.paths = list(paths)
        self.size = size

    def __getitem__(self, index: int) -> np.ndarray:
        return resize_square(read_grayscale(self.paths[index]), self.size)

    def __len__(self) -> int:
        return len(self.paths)


class ManifestDataset(Dataset):
    """Images of a manifest frame (see :mod:`tus.data.manifest`) through a transform.

    With ``cache`` and an integer ``image_size`` the images come from the on-disk decoded
    cache (:func:`tus.data.cache.cached_images`, folder ``cache_dir`` or the default): each
    file is decoded once per process and, while its bytes stay the same, once across runs.
    Otherwise every access decodes the file (``image_size=None`` keeps each image's size,
    which one array cannot hold).
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        transform: Transform,
        *,
        image_size: int | None = None,
        organ_index: dict[str, int] | None = None,
        cache: bool = True,
        cache_dir: str | Path | None = None,
    ):
        self.frame = frame.reset_index(drop=True)
        self.transform = transform
        paths = self.frame["abs_path"].tolist()
        self.images: CachedImages | DecodedImages = cached_images(paths, image_size, cache_dir) if cache and image_size else DecodedImages(paths, image_size)
        self.sample_ids = self.frame["sample_id"].astype(str).tolist()
        self.patient_ids = self.frame["patient_id"].astype(str).tolist() if "patient_id" in self.frame else self.sample_ids
        self.labels = self.frame["label"].astype(int).to_numpy() if "label" in self.frame else np.full(len(self.frame), -1)
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
