"""LightningDataModules shared by every stage.

- :class:`LabeledDataModule`: one fold of patient-grouped K-fold CV over a labelled
  manifest, with a class-balancing weighted sampler and per-image augmentation.
- :class:`ImagePoolDataModule`: an unlabelled pool mixed from manifests and/or folders of
  (e.g. synthetic) images, each source with a sampling weight; used by pretraining and
  diffusion training.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, WeightedRandomSampler

from tus.data.cache import cached_images
from tus.data.configs import ImageSourceConfig as ImageSourceConfig
from tus.data.configs import LabeledDataConfig as LabeledDataConfig
from tus.data.datasets import ManifestDataset
from tus.data.images import list_images
from tus.data.manifest import load_manifest
from tus.data.seeding import derive_seed
from tus.data.synthetic import select_synthetic
from tus.data.transforms import (
    _transforms_of,
    eval_transform,
    finetune_train_transform,
    seed_transform_in_worker,
)


class SamplerGenerator:
    """The sampler's torch.Generator, made on first use.

    A generator cannot be pickled, and ``ddp_spawn`` pickles the datamodule into each
    process before any loader exists; creating it lazily keeps the datamodule picklable.
    """

    def __init__(self, seed: int):
        self.seed = seed
        self._generator: torch.Generator | None = None

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._generator = None

    def __getstate__(self) -> dict:
        return {"seed": self.seed, "_generator": None}


def class_balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights 1/count(class): every class is drawn equally often in expectation."""
    classes, counts = np.unique(labels, return_counts=True)
    per_class = dict(zip(classes.tolist(), (1.0 / counts).tolist()))
    return np.array([per_class[label] for label in labels.tolist()], dtype=np.float64)


def inner_validation_split(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into (train, val) index arrays by patient, stratified by class."""
    splits = max(2, round(1.0 / fraction))
    splitter = StratifiedGroupKFold(n_splits=splits, shuffle=True, random_state=seed)
    train_index, val_index = next(splitter.split(np.zeros(len(frame)), frame["label"], frame["patient_id"]))
    return train_index, val_index


class LabeledDataModule(L.LightningDataModule):
    """Train on every fold but ``test_fold``; test on ``test_fold``. ``test_fold=None`` trains on every row
    and has no test set (a refit on all labelled images; ``folds`` is then unused).

    With ``inner_validation`` a stratified patient-grouped slice of the training folds
    becomes the validation set used for model selection; the test fold is only ever used
    for the final test.
    """

    def __init__(
        self,
        config: LabeledDataConfig,
        frame: pd.DataFrame,
        folds: np.ndarray | None,
        test_fold: int | None,
        seed: int,
        inner_validation: bool = False,
        synthetic: pd.DataFrame | None = None,
    ):
        super().__init__()
        self.config = config
        # Generated images (tus.data.synthetic.read_synthetic) for the training rows only.
        self.synthetic = synthetic
        self.train_frame: pd.DataFrame | None = None
        self.frame = frame.reset_index(drop=True)
        self.folds = np.asarray(folds) if test_fold is not None else np.zeros(len(self.frame), dtype=int)
        self.test_fold = test_fold
        self.seed = seed
        self.inner_validation = inner_validation
        self.train_set = self.val_set = self.test_set = None
        self._sampler = SamplerGenerator(seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.config.cache_images and self.config.image_size:
            # Decode the whole manifest into one cache first: every fold x seed then reads
            # its rows from it, and the cache's key does not depend on the fold split.
            cached_images(self.frame["abs_path"].tolist(), self.config.image_size, self.config.cache_dir)
        test_rows = self.folds == self.test_fold if self.test_fold is not None else np.zeros(len(self.frame), dtype=bool)
        train_frame = self.frame[~test_rows].reset_index(drop=True)
        test_frame = self.frame[test_rows].reset_index(drop=True)
        if self.inner_validation:
            train_index, val_index = inner_validation_split(train_frame, self.config.inner_val_fraction, self.seed)
            val_frame = train_frame.iloc[val_index].reset_index(drop=True)
            train_frame = train_frame.iloc[train_index].reset_index(drop=True)
            self.val_set = self._dataset(val_frame, eval_transform())
        if self.synthetic is not None:
            # After the inner split: generated images train, never validate or test.
            chosen = select_synthetic(self.synthetic, train_frame["label"].to_numpy(), self.config.synthetic, self.seed, self.config.synthetic.source or "")
            real = train_frame.assign(synthetic=False)
            train_frame = chosen if self.config.synthetic.only else pd.concat([real, chosen], ignore_index=True)
        self.train_frame = train_frame
        train_transform = finetune_train_transform(self.config.augment, seed=self.seed)
        self.train_set = self._dataset(train_frame, train_transform)
        self.test_set = self._dataset(test_frame, eval_transform())

    def _dataset(self, frame: pd.DataFrame, transform) -> ManifestDataset:
        return ManifestDataset(frame, transform, image_size=self.config.image_size, cache=self.config.cache_images, cache_dir=self.config.cache_dir)

    def train_dataloader(self) -> DataLoader:
        # One generator per datamodule: a reloaded loader continues the stream, not restarts it.
        generator = self._sampler.generator
        sampler = None
        if self.config.weighted_sampler:
            weights = class_balanced_weights(self.train_set.labels)
            sampler = WeightedRandomSampler(weights.tolist(), num_samples=len(weights), replacement=True, generator=generator)
        return self._loader(self.train_set, self.config.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator, drop_last=len(self.train_set) > self.config.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, self.config.eval_batch_size) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.config.eval_batch_size)

    def _loader(self, dataset, batch_size: int, **kwargs) -> DataLoader:
        workers = self.config.num_workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=seed_transform_in_worker,
            **kwargs,
        )


def read_image_source(source: ImageSourceConfig) -> pd.DataFrame:
    """A validated frame (``abs_path``, ``sample_id``, ``patient_id``, ``organ``) for a source."""
    if (source.manifest is None) == (source.folder is None):
        raise ValueError("an image source needs exactly one of 'manifest' or 'folder'")
    if source.manifest is not None:
        frame = load_manifest(source.manifest, require_labels=False, decode_images=False, dicom_frames=source.dicom_frames)
    else:
        paths = list_images(source.folder)
        if not paths:
            raise ValueError(f"{source.folder}: no images found")
        names = [str(p) for p in paths]
        frame = pd.DataFrame({"path": names, "abs_path": names, "sample_id": names, "patient_id": names, "label": -1})
    if "organ" not in frame.columns:
        frame["organ"] = ""
    if source.organ is not None:
        frame.loc[frame["organ"] == "", "organ"] = source.organ
    return frame


class PositionedWeightedSampler(DistributedSampler):
    """Weighted draws with replacement: the ``position``-th draw of epoch ``e`` depends on (seed, e, position) only.

    Each epoch's draws come from a generator seeded by (seed, epoch) and are split over the ranks
    (position ``p`` goes to rank ``p mod num_replicas``); every draw is yielded as ``(index,
    view_seed)`` with ``view_seed`` from (seed, epoch, position), for :class:`SeededDraws`.
    ``consumed(samples_per_rank)`` is the number of this rank's draws the current epoch has already trained on:
    Lightning restarts a plain loader at the start of the epoch when it resumes from a mid-epoch
    checkpoint, so the sampler skips those and the resumed run sees the same images and views at
    the same steps as an uninterrupted one. Being a ``DistributedSampler``, Lightning neither wraps
    it nor forgets its ``set_epoch``.
    """

    def __init__(
        self,
        dataset: Dataset,
        weights: np.ndarray,
        samples_per_rank: int,
        *,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        consumed: Callable[[int], int] | None = None,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.samples_per_rank = samples_per_rank
        self.consumed = consumed

    def __iter__(self):
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        total = self.samples_per_rank * self.num_replicas
        draws = torch.multinomial(self.weights, total, replacement=True, generator=generator).tolist()
        start = self.consumed(self.samples_per_rank) if self.consumed is not None else 0
        for position in range(self.rank + start * self.num_replicas, total, self.num_replicas):
            yield draws[position], derive_seed(self.seed, self.epoch, position) % (2**32)

    def __len__(self) -> int:
        return self.samples_per_rank


class SeededDraws(Dataset):
    """``dataset`` addressed by ``(index, seed)``: its transforms are reseeded from the draw's seed
    before the item is made, so an item's augmentation depends on its draw alone, not on the
    DataLoader workers or on what was drawn before (what makes a resumed stream exact)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.transforms = _transforms_of(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        for transform in self.transforms:
            transform.reseed(seed)
        return self.dataset[index]


class ImagePoolDataModule(L.LightningDataModule):
    """Unlabelled images from several weighted sources through one transform.

    ``organ_classes`` fixes the organ vocabulary (index = position); with ``None`` it is
    the sorted set of organs found. Sources are drawn with replacement according to their
    weights; the step budget (``max_steps``) rather than epochs bounds training. The draws and
    their augmentations are a function of (seed, epoch, position) (:class:`PositionedWeightedSampler`),
    so a run resumed from any checkpoint, mid-epoch included, replays the uninterrupted run.
    """

    def __init__(
        self,
        sources: list[ImageSourceConfig],
        transform: Callable,
        *,
        image_size: int,
        batch_size: int,
        num_workers: int = 2,
        organ_classes: list[str] | None = None,
        require_organ: bool = False,
        cache_images: bool = True,
        seed: int = 0,
        samples_per_epoch: int | None = None,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if not sources:
            raise ValueError("the image pool needs at least one source")
        self.sources = sources
        self.transform = transform
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.organ_classes = organ_classes
        self.require_organ = require_organ
        self.cache_images = cache_images
        self.cache_dir = cache_dir
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch
        self.frames: list[pd.DataFrame] = []
        # The sources as read, before a subclass moves rows out (e.g. a held-out probe slice).
        self.source_frames: list[pd.DataFrame] = []
        self.dataset: ConcatDataset | None = None

    def prepare_frames(self) -> list[pd.DataFrame]:
        if not self.frames:
            self.frames = [read_image_source(s) for s in self.sources]
            self.source_frames = list(self.frames)
            if self.require_organ:
                for source, frame in zip(self.sources, self.frames):
                    missing = frame[frame["organ"] == ""]
                    if not missing.empty:
                        name = source.manifest or source.folder
                        raise ValueError(f"{name}: {len(missing)} image(s) without an organ, e.g. {missing['path'].iloc[0]}; add an 'organ' column or set the source's organ")
            if self.organ_classes is None:
                self.organ_classes = sorted({o for f in self.frames for o in f["organ"] if o})
        return self.frames

    @property
    def organ_index(self) -> dict[str, int]:
        self.prepare_frames()
        return {name: i for i, name in enumerate(self.organ_classes)}

    def organ_counts(self) -> dict[str, int]:
        """Images per organ across the pool (reported so users see the class balance)."""
        counts: dict[str, int] = {}
        for frame in self.prepare_frames():
            for organ, n in frame["organ"].replace("", "(none)").value_counts().items():
                counts[organ] = counts.get(organ, 0) + int(n)
        return counts

    def decode_images(self) -> None:
        """Decode every image of the pool into the image cache (when caching), once per process.

        Stages call this before they make a run dir, so a corrupt pool image is refused before
        anything is written; ``setup`` then finds the images decoded."""
        self.prepare_frames()
        if self.cache_images and self.image_size:
            # One cache per whole source: the pool, a held-out slice and a probe bank drawn
            # from it all read rows of it, and its key does not depend on the split seed.
            for frame in self.source_frames:
                cached_images(frame["abs_path"].tolist(), self.image_size, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        organ_index = self.organ_index
        self.decode_images()
        parts = [
            ManifestDataset(
                frame,
                self.transform,
                image_size=self.image_size,
                organ_index=organ_index,
                cache=self.cache_images,
                cache_dir=self.cache_dir,
            )
            for frame in self.prepare_frames()
        ]
        self.dataset = ConcatDataset(parts)

    def sample_weights(self) -> np.ndarray:
        weights = []
        for source, part in zip(self.sources, self.dataset.datasets):
            weights.append(np.full(len(part), source.weight / len(part)))
        return np.concatenate(weights)

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            raise RuntimeError("ImagePoolDataModule.train_dataloader() before setup()")
        trainer = self.trainer
        world_size, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        weights = self.sample_weights()
        samples_per_rank = -(-(self.samples_per_epoch or len(weights)) // world_size)
        sampler = PositionedWeightedSampler(
            self.dataset,
            weights,
            samples_per_rank,
            seed=self.seed,
            num_replicas=world_size,
            rank=rank,
            consumed=self._consumed_this_epoch,
        )
        return DataLoader(
            SeededDraws(self.dataset),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=True,
        )

    def _consumed_this_epoch(self, samples_per_rank: int) -> int:
        """This rank's draws the current epoch has already trained on (0 but in a resumed run).

        Read when the epoch's iterator first yields, after Lightning restored the step and epoch:
        every epoch has the same number of batches, so the steps done say where in it the run is.
        """
        trainer = self.trainer
        if trainer is None:
            return 0
        batches_per_epoch = samples_per_rank // self.batch_size
        done = trainer.global_step * trainer.accumulate_grad_batches - trainer.current_epoch * batches_per_epoch
        return min(max(done, 0), batches_per_epoch) * self.batch_size
