"""DataModules over unlabelled image pools for the generative and self-supervised stages:
pretraining (two views per image, organ-balanced draws, a held-out probe slice; resumable exactly,
mid-epoch included) and diffusion
(epochs of a fixed number of steps drawn with replacement, resumable exactly).

Both pools can leave out the labelled images (``exclude_labeled``): the reference's pools contain
the labelled set, so its test-fold images reach pretraining and diffusion training. The images
left out are found by :mod:`tus.data.overlap` and listed in :meth:`pool_report` (``pool.json``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from tus.config import require_at_least
from tus.data.datamodules import ImagePoolDataModule, ImageSourceConfig
from tus.data.datasets import ManifestDataset
from tus.data.images import content_hash
from tus.data.manifest import load_manifest
from tus.data.near_duplicates import MAX_DISTANCE, NearDuplicateConfig
from tus.data.overlap import EXCLUDE_MODES, ExcludeLabeled, exclude_labeled, find_overlap, labeled_folds, overlap_report
from tus.data.seeding import derive_seed
from tus.data.transforms import eval_transform
from tus.data.views import ViewConfig, ViewPairTransform


@dataclass
class DiffusionDataConfig:
    sources: list[ImageSourceConfig] = field(default_factory=lambda: [ImageSourceConfig(manifest="data/phantom/labeled/manifest.csv")])
    image_size: int = 256
    batch_size: int = 16
    num_workers: int = 2
    cache_images: bool = True
    hflip: bool = True
    # Optimiser steps per "epoch": checkpoints are written at epoch ends only, where a
    # resume replays the same draws as an uninterrupted run.
    steps_per_epoch: int = 1000
    # Leakage guard (see LabeledExclusion); "none" keeps the reference's pool.
    exclude_labeled: ExcludeLabeled = "none"
    labeled_manifest: str | None = None
    test_folds: list[int] | None = None
    # Near duplicates (bits of 256, tus.data.near_duplicates) of the excluded images leave too; null: exact copies only.
    near_duplicate_distance: int | None = MAX_DISTANCE

    def __post_init__(self) -> None:
        require_at_least(self, "data.", 1, "image_size", "batch_size", "steps_per_epoch")
        require_at_least(self, "data.", 0, "num_workers")


@dataclass(frozen=True)
class LabeledExclusion:
    """Which labelled images to leave out of a pool.

    ``exclude_labeled``: ``none`` (the reference), ``test_folds`` (the labelled manifest needs a
    ``fold`` column, e.g. a CV run's folds.csv) or ``all`` (every labelled image). What leaves
    the pool (:func:`tus.data.overlap.find_overlap`): copies of those labelled images (identical
    files or pixels), their near duplicates (within ``near_duplicate_distance`` bits; None: exact
    copies only) and, where the pool carries the labelled set's ``patient_id``, every image of
    their patients and its near duplicates.
    """

    exclude_labeled: ExcludeLabeled = "none"
    labeled_manifest: str | None = None
    test_folds: tuple[int, ...] | None = None
    near_duplicate_distance: int | None = MAX_DISTANCE

    @classmethod
    def of(cls, config) -> LabeledExclusion:
        folds = getattr(config, "test_folds", None)
        return cls(
            getattr(config, "exclude_labeled", "none"),
            getattr(config, "labeled_manifest", None),
            tuple(folds) if folds is not None else None,
            getattr(config, "near_duplicate_distance", MAX_DISTANCE),
        )

    def __post_init__(self) -> None:
        if self.exclude_labeled not in EXCLUDE_MODES:
            raise ValueError(f"exclude_labeled must be one of {', '.join(EXCLUDE_MODES)}, got {self.exclude_labeled!r}")
        if self.exclude_labeled != "none" and not self.labeled_manifest:
            raise ValueError(f"exclude_labeled: {self.exclude_labeled} needs labeled_manifest")
        if self.exclude_labeled == "test_folds" and not self.test_folds:
            raise ValueError("exclude_labeled: test_folds needs test_folds (e.g. [0, 1, 2])")

    def apply(self, frames: list[pd.DataFrame], sources: list[ImageSourceConfig]) -> tuple[list[pd.DataFrame], dict]:
        """(frames without the excluded images, the record for pool.json)."""
        record: dict = {"exclude_labeled": self.exclude_labeled}
        if self.exclude_labeled == "none":
            return frames, record
        labeled = load_manifest(self.labeled_manifest, require_labels=False, decode_images=False)
        if self.exclude_labeled == "test_folds" and "fold" not in labeled.columns:
            raise ValueError(f"{self.labeled_manifest}: exclude_labeled: test_folds needs a 'fold' column (give the CV run's folds.csv)")
        folds = labeled_folds(labeled) if "fold" in labeled.columns else np.full(len(labeled), -1)
        near = NearDuplicateConfig(self.near_duplicate_distance) if self.near_duplicate_distance is not None else None
        kept, excluded, reports = [], [], {}
        for source, frame in zip(sources, frames):
            overlap = find_overlap(frame, labeled, folds, near)
            reports[str(source.manifest or source.folder)] = overlap_report(overlap, folds, len(frame))
            frame, dropped = exclude_labeled(frame, overlap, self.exclude_labeled, list(self.test_folds or []))
            if frame.empty:
                raise ValueError(f"{source.manifest or source.folder}: no images left after exclude_labeled: {self.exclude_labeled}")
            kept.append(frame)
            excluded.append(dropped.assign(source=str(source.manifest or source.folder)))
        excluded_rows = pd.concat(excluded, ignore_index=True)
        in_test = np.isin(folds, list(self.test_folds or [])) if self.exclude_labeled == "test_folds" else np.ones(len(labeled), dtype=bool)
        record.update(
            {
                "labeled_manifest": str(self.labeled_manifest),
                # What the fine-tuning checks an encoder against (tus.models.exclusion): whose images were left out.
                "labeled_manifest_hash": content_hash(self.labeled_manifest),
                "test_folds": list(self.test_folds) if self.test_folds else None,
                "excluded_patients": sorted(set(labeled.loc[in_test, "patient_id"].astype(str))),
                "excluded_labeled_images": int(in_test.sum()),
                "near_duplicate_distance": self.near_duplicate_distance,
                "overlap_per_source": reports,
                "excluded_images": int(excluded_rows[["source", "pool_row"]].drop_duplicates().shape[0]),
                "excluded": excluded_rows.drop(columns="pool_row").drop_duplicates(["source", "pool_path"]).to_dict("records"),
            }
        )
        return kept, record


def encoder_exclusion(record: dict | None) -> dict:
    """The ``exclusion`` an encoder export records (``config.json``): which labelled images and patients its
    pool left out, from a pool report's ``excluded_labeled`` record. The fine-tuning of fold k checks it
    (:func:`tus.stages.finetune_cv.check_encoder_exclusion`)."""
    record = record or {"exclude_labeled": "none"}
    if record.get("exclude_labeled", "none") == "none":
        return {"mode": "none"}
    return {
        "mode": record["exclude_labeled"],
        "labeled_manifest": record["labeled_manifest"],
        "labeled_manifest_hash": record["labeled_manifest_hash"],
        "test_folds": record["test_folds"],
        "excluded_patients": record["excluded_patients"],
        "excluded_patient_count": len(record["excluded_patients"]),
        "excluded_labeled_images": record["excluded_labeled_images"],
        "excluded_pool_images": record["excluded_images"],
        "near_duplicate_distance": record["near_duplicate_distance"],
    }


def to_signed_unit(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) -> float (1, H, W) in [-1, 1], the range the diffusion process assumes."""
    return torch.from_numpy(image).float().div(127.5).sub(1.0).unsqueeze(0)


class EpochWeightedSampler(DistributedSampler):
    """Weighted draws with replacement, redrawn reproducibly from (seed, epoch), split over ranks.

    Being a ``DistributedSampler``, Lightning neither wraps it nor forgets to call
    ``set_epoch``, so the draws of an epoch are the same whether or not the run was resumed.
    """

    def __init__(self, dataset: Dataset, weights: np.ndarray, samples_per_rank: int, seed: int, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.samples_per_rank = samples_per_rank

    def __iter__(self):
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        draws = torch.multinomial(self.weights, self.samples_per_rank * self.num_replicas, replacement=True, generator=generator)
        return iter(draws[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.samples_per_rank


class DiffusionDataModule(ImagePoolDataModule):
    """The image pool in [-1, 1]; an epoch is ``steps_per_epoch`` optimiser steps on every rank."""

    def __init__(self, config: DiffusionDataConfig, seed: int):
        super().__init__(
            config.sources,
            to_signed_unit,
            image_size=config.image_size,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            cache_images=config.cache_images,
            seed=seed,
        )
        self.steps_per_epoch = config.steps_per_epoch
        self.exclusion = LabeledExclusion.of(config)
        self.excluded: dict | None = None

    def prepare_frames(self) -> list[pd.DataFrame]:
        if self.excluded is None:
            frames = super().prepare_frames()
            self.frames, self.excluded = self.exclusion.apply(frames, self.sources)
        return self.frames

    def pool_report(self) -> dict:
        """Images per source, and the labelled images left out of the pool (``exclude_labeled``)."""
        frames = self.prepare_frames()
        return {
            "images_per_source": {str(s.manifest or s.folder): len(f) for s, f in zip(self.sources, frames)},
            "images_per_label": {str(k): v for k, v in self.label_counts().items()},
            "excluded_labeled": self.excluded,
        }

    def label_counts(self) -> dict[int, int]:
        """Images per class label across the pool (-1: unlabelled), for a class-conditional model."""
        counts: dict[int, int] = {}
        for frame in self.prepare_frames():
            labels = frame["label"].astype(int) if "label" in frame.columns else pd.Series(-1, index=frame.index)
            for label, n in labels.value_counts().items():
                counts[int(label)] = counts.get(int(label), 0) + int(n)
        return dict(sorted(counts.items()))

    def check_labels(self, num_classes: int) -> None:
        """A conditional model needs labelled images, each label in 0..num_classes-1 (unlabelled ones train "no label")."""
        counts = self.label_counts()
        names = ", ".join(str(s.manifest or s.folder) for s in self.sources)
        outside = [label for label in counts if label >= num_classes or label < -1]
        if outside:
            raise ValueError(f"{names}: label {outside[0]} is outside 0..{num_classes - 1} (unet.num_classes={num_classes})")
        if not any(label >= 0 for label in counts):
            raise ValueError(f"{names}: no labelled image, but unet.num_classes={num_classes} trains a class-conditional model; give a manifest with a 'label' column")

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world_size, rank, accumulate = (trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches) if trainer else (1, 0, 1)
        samples = self.steps_per_epoch * accumulate * self.batch_size
        sampler = EpochWeightedSampler(self.dataset, self.sample_weights(), samples, self.seed, world_size, rank)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=True,
        )


@dataclass
class PretrainDataConfig:
    """The unlabelled pool: weighted sources, input size, per-device batch, views."""

    sources: list[ImageSourceConfig] = field(default_factory=list)
    image_size: int = 224
    batch_size: int = 512
    num_workers: int = 4
    # Fixes the organ vocabulary (head index = position); None: the sorted organs found.
    organ_classes: list[str] | None = None
    require_organ: bool = False
    cache_images: bool = True
    samples_per_epoch: int | None = None
    views: ViewConfig = field(default_factory=ViewConfig)
    # Leakage guard (see LabeledExclusion); "none" keeps the reference's pool.
    exclude_labeled: ExcludeLabeled = "none"
    labeled_manifest: str | None = None
    test_folds: list[int] | None = None
    # Near duplicates (bits of 256, tus.data.near_duplicates) of the excluded images leave too; null: exact copies only.
    near_duplicate_distance: int | None = MAX_DISTANCE

    def __post_init__(self) -> None:
        require_at_least(self, "data.", 1, "image_size", "batch_size", "samples_per_epoch")
        require_at_least(self, "data.", 0, "num_workers")


def split_heldout(frames: list[pd.DataFrame], per_organ: int, seed: int) -> tuple[list[pd.DataFrame], pd.DataFrame]:
    """Move about ``per_organ`` images of each organ out of the pool, whole patients at a time.

    Images of one patient (or, without patient ids, one image) stay on one side, so near
    duplicates cannot leak into the probe. At most half of an organ's images are held out.
    Images without an organ always stay in the pool. Returns (pool frames, held-out frame).
    """
    rng = np.random.default_rng(seed)
    tagged = pd.concat([f.assign(source=i, row=np.arange(len(f))) for i, f in enumerate(frames)], ignore_index=True)
    groups = tagged["source"].astype(str) + "/" + tagged["patient_id"].astype(str)
    held = np.zeros(len(tagged), dtype=bool)
    for organ in sorted(set(tagged["organ"]) - {""}):
        of_organ = (tagged["organ"] == organ).to_numpy()
        budget = min(per_organ, int(of_organ.sum()) // 2)
        for group in rng.permutation(groups[of_organ].unique()):
            if held[of_organ].sum() >= budget:
                break
            held |= (groups == group).to_numpy() & of_organ
    pool = []
    for i, frame in enumerate(frames):
        held_rows = tagged.loc[held & (tagged["source"] == i).to_numpy(), "row"].to_numpy()
        pool.append(frame.drop(index=frame.index[held_rows]).reset_index(drop=True))
    return pool, tagged.loc[held, PROBE_COLUMNS].reset_index(drop=True)


def sample_per_organ(frames: list[pd.DataFrame], per_organ: int, seed: int) -> pd.DataFrame:
    """Up to ``per_organ`` random images of each organ from the pool (the k-NN bank)."""
    rows = pd.concat([f[PROBE_COLUMNS] for f in frames], ignore_index=True)
    rows = rows[rows["organ"] != ""]
    picked = [group.sample(n=min(per_organ, len(group)), random_state=seed) for _, group in rows.groupby("organ")]
    return pd.concat(picked, ignore_index=True) if picked else rows.iloc[:0]


class PretrainDataModule(ImagePoolDataModule):
    """The weighted image pool through a :class:`ViewPairTransform`, minus a held-out slice.

    The held-out slice (``holdout_per_organ`` images per organ) and a bank of pool images
    feed the :class:`OrganProbe`. Images and views are drawn as a function of (seed, epoch,
    position) (see :class:`ImagePoolDataModule`): a run resumed from a checkpoint, mid-epoch
    included, trains on exactly the batches the uninterrupted run would have.
    """

    def __init__(self, config: PretrainDataConfig, *, seed: int, holdout_per_organ: int = 0, transform: Callable | None = None):
        # ``transform``: the pretraining method's per-image transform (two views by default).
        super().__init__(
            config.sources,
            transform if transform is not None else ViewPairTransform(config.views, config.image_size, seed=seed),
            image_size=config.image_size,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            organ_classes=config.organ_classes,
            require_organ=config.require_organ,
            cache_images=config.cache_images,
            seed=seed,
            samples_per_epoch=config.samples_per_epoch,
        )
        self.holdout_per_organ = holdout_per_organ
        self.heldout: pd.DataFrame | None = None
        self.exclusion = LabeledExclusion.of(config)
        self.excluded: dict | None = None

    def prepare_frames(self) -> list[pd.DataFrame]:
        if self.heldout is None:
            # Labelled images leave first, so neither the pool nor the probe slice holds them.
            frames, self.excluded = self.exclusion.apply(super().prepare_frames(), self.sources)
            self.frames, self.heldout = split_heldout(frames, self.holdout_per_organ, self.seed)
            for source, frame in zip(self.sources, self.frames):
                if frame.empty:
                    raise ValueError(f"{source.manifest or source.folder}: no images left for training after holding out the probe slice; lower monitor.holdout_per_organ")
        return self.frames

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        # Per-rank view streams for transforms that draw their own randomness (contract of tus.methods.base).
        if hasattr(self.transform, "set_rank"):
            self.transform.set_rank(self.trainer.global_rank if self.trainer is not None else 0)

    def probe_datasets(self, bank_per_organ: int) -> tuple[ManifestDataset, ManifestDataset]:
        """(bank from the pool, held-out slice), single views under the eval transform."""
        frames = self.prepare_frames()
        bank = sample_per_organ(frames, bank_per_organ, self.seed)
        return tuple(ManifestDataset(frame, eval_transform(), image_size=self.image_size, organ_index=self.organ_index, cache=self.cache_images) for frame in (bank, self.heldout))

    def pool_report(self) -> dict:
        """Images per organ in the training pool, each organ's expected share of the draws."""
        frames = self.prepare_frames()
        total_weight = sum(s.weight for s in self.sources)
        share: dict[str, float] = {}
        for source, frame in zip(self.sources, frames):
            fractions = frame["organ"].replace("", "(none)").value_counts(normalize=True)
            for organ, fraction in fractions.items():
                share[organ] = share.get(organ, 0.0) + source.weight / total_weight * float(fraction)
        return {
            "organ_classes": list(self.organ_classes),
            "images_per_organ": self.organ_counts(),
            "draw_share_per_organ": {k: round(v, 4) for k, v in sorted(share.items())},
            "images_per_source": {str(s.manifest or s.folder): len(f) for s, f in zip(self.sources, frames)},
            "heldout_per_organ": {k: int(v) for k, v in self.heldout["organ"].value_counts().sort_index().items()},
            "excluded_labeled": self.excluded,
        }


PROBE_COLUMNS = ["path", "abs_path", "sample_id", "patient_id", "label", "organ"]
