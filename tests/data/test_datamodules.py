"""LabeledDataModule: fold split, class-balanced sampling, per-image augmentation, caching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tus.data.cache as cache_module
from tests.helpers import make_labeled_dataset
from tus.data.cache import (
    CACHE_DIR_ENV,
    CachedImages,
    clear_memory_cache,
    resize_square,
)
from tus.data.datamodules import (
    ImagePoolDataModule,
    ImageSourceConfig,
    LabeledDataConfig,
    LabeledDataModule,
    class_balanced_weights,
)
from tus.data.folds import assign_folds
from tus.data.images import read_grayscale
from tus.data.manifest import load_manifest
from tus.data.transforms import AugmentConfig, finetune_train_transform


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh disk cache per test and an empty process memo, as in a new process."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache-root"))
    clear_memory_cache()
    yield tmp_path / "cache-root" / "images"
    clear_memory_cache()


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path the disk cache decodes, in order."""
    calls: list[str] = []
    original = cache_module.read_grayscale
    monkeypatch.setattr(cache_module, "read_grayscale", lambda p: calls.append(str(p)) or original(p))
    return calls


def datamodule(manifest: Path, test_fold: int = 0, seed: int = 0, **overrides) -> LabeledDataModule:
    frame = load_manifest(manifest)
    folds = assign_folds(frame, 3, 0)
    options = {"image_size": 32, "batch_size": 8, "num_workers": 0, **overrides}
    config = LabeledDataConfig(manifest=str(manifest), **options)
    module = LabeledDataModule(config, frame, folds, test_fold=test_fold, seed=seed)
    module.setup("fit")
    return module


def test_train_and_test_split_by_fold_without_shared_patients(labeled_manifest: Path):
    module = datamodule(labeled_manifest)
    train_patients = set(module.train_set.patient_ids)
    test_patients = set(module.test_set.patient_ids)
    assert train_patients.isdisjoint(test_patients)
    assert len(module.train_set) + len(module.test_set) == 24


def test_weighted_sampler_balances_classes(tmp_path: Path):
    manifest = make_labeled_dataset(tmp_path, patients=40, per_patient=1, positive_every=5)
    module = datamodule(manifest)
    labels = module.train_set.labels
    assert labels.mean() < 0.3  # imbalanced input
    weights = class_balanced_weights(labels)
    assert np.isclose(weights[labels == 1].sum(), weights[labels == 0].sum())
    drawn = []
    for _ in range(60):
        for batch in module.train_dataloader():
            drawn += batch["label"].tolist()
    share = np.mean(drawn)
    assert abs(share - 0.5) < 0.05, share


def test_without_sampler_classes_keep_their_share(tmp_path: Path):
    manifest = make_labeled_dataset(tmp_path, patients=40, per_patient=1, positive_every=5)
    module = datamodule(manifest, weighted_sampler=False)
    drawn = [label for batch in module.train_dataloader() for label in batch["label"].tolist()]
    # A shuffled pass over the set (minus the dropped last partial batch): the prior is kept.
    assert len(drawn) >= len(module.train_set) - 7
    assert abs(np.mean(drawn) - module.train_set.labels.mean()) < 0.05


def test_each_image_gets_its_own_augmentation_draw():
    transform = finetune_train_transform(AugmentConfig(markers_p=0.0, affine_p=1.0, hflip_p=0.0), seed=0)
    image = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    outputs = [transform(image) for _ in range(6)]
    assert all(o.shape == (1, 32, 32) and o.dtype == torch.float32 for o in outputs)
    distinct = {o.numpy().tobytes() for o in outputs}
    assert len(distinct) == 6  # one draw per call, never shared


def test_augmentation_reproducible_by_seed():
    image = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    first = [finetune_train_transform(AugmentConfig(), seed=3)(image) for _ in range(1)]
    a = finetune_train_transform(AugmentConfig(), seed=3)
    b = finetune_train_transform(AugmentConfig(), seed=3)
    for _ in range(4):
        assert torch.equal(a(image), b(image))
    assert torch.equal(first[0], finetune_train_transform(AugmentConfig(), seed=3)(image))


def test_eval_batches_are_normalised_and_carry_ids(labeled_manifest: Path):
    module = datamodule(labeled_manifest)
    batch = next(iter(module.test_dataloader()))
    assert set(batch) >= {"image", "sample_id", "label", "patient_id", "index", "organ"}
    image = batch["image"]
    assert image.shape[1:] == (1, 32, 32)
    assert image.min() >= -2.0 - 1e-6 and image.max() <= 2.0 + 1e-6  # (x/255 - 0.5) / 0.25
    assert all(isinstance(s, str) for s in batch["sample_id"])


def test_images_are_decoded_once(labeled_manifest: Path, decodes: list[str]):
    module = datamodule(labeled_manifest)
    assert len(decodes) == 24
    for _ in range(3):
        for _ in module.train_dataloader():
            pass
    assert len(decodes) == 24


def test_every_fold_and_seed_of_a_cv_shares_one_decode(labeled_manifest: Path, decodes: list[str]):
    modules = [datamodule(labeled_manifest, fold, seed, image_size=64) for seed in (0, 1) for fold in range(3)]
    assert sorted(decodes) == sorted(set(decodes)) and len(decodes) == 24  # each file exactly once
    for module in modules:
        for dataset in (module.train_set, module.test_set):
            for i in (0, len(dataset) - 1):
                direct = resize_square(read_grayscale(dataset.frame["abs_path"][i]), 64)
                assert np.array_equal(dataset.images[i], direct)
    clear_memory_cache()  # a later process: the disk cache answers, nothing is decoded
    again = datamodule(labeled_manifest, 1, 0, image_size=64)
    assert len(decodes) == 24
    assert np.array_equal(again.test_set.images[0], modules[1].test_set.images[0])


def test_explicit_cache_dir_and_uncached_paths(labeled_manifest: Path, tmp_path: Path, decodes: list[str]):
    module = datamodule(labeled_manifest, cache_dir=str(tmp_path / "mine"))
    assert len(list((tmp_path / "mine").glob("*.npy"))) == 1
    uncached = datamodule(labeled_manifest, cache_images=False)
    assert len(decodes) == 24  # nothing new went through the cache
    assert not isinstance(uncached.test_set.images, CachedImages)  # it decodes on access
    assert np.array_equal(uncached.test_set.images[0], module.test_set.images[0])


def test_pool_subsets_reuse_the_sources_cache(labeled_manifest: Path, decodes: list[str]):
    from tus.data.datasets import ManifestDataset
    from tus.data.transforms import eval_transform

    pool = ImagePoolDataModule([ImageSourceConfig(manifest=str(labeled_manifest))], eval_transform(), image_size=32, batch_size=4, num_workers=0)
    pool.setup("fit")
    assert len(decodes) == 24 and len(pool.dataset) == 24
    bank = pool.source_frames[0].iloc[[5, 2, 11]]
    probe = ManifestDataset(bank, eval_transform(), image_size=32, organ_index=pool.organ_index)
    assert len(decodes) == 24
    assert np.array_equal(probe.images[1], resize_square(read_grayscale(bank["abs_path"].iloc[1]), 32))
