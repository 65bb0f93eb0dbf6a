"""LabeledDataModule: fold split, class-balanced sampling, per-image augmentation, caching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.helpers import make_labeled_dataset
from tus.data.datamodules import LabeledDataConfig, LabeledDataModule, class_balanced_weights
from tus.data.folds import assign_folds
from tus.data.manifest import load_manifest
from tus.data.transforms import AugmentConfig, finetune_train_transform


def datamodule(manifest: Path, **overrides) -> LabeledDataModule:
    frame = load_manifest(manifest)
    folds = assign_folds(frame, 3, 0)
    config = LabeledDataConfig(manifest=str(manifest), image_size=32, batch_size=8, num_workers=0, **overrides)
    module = LabeledDataModule(config, frame, folds, test_fold=0, seed=0)
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


def test_images_are_decoded_once(labeled_manifest: Path, monkeypatch):
    import tus.data.datasets as datasets

    calls = []
    original = datasets.read_grayscale
    monkeypatch.setattr(datasets, "read_grayscale", lambda p: calls.append(p) or original(p))
    module = datamodule(labeled_manifest)
    decoded = len(calls)
    assert decoded == 24
    for _ in range(3):
        for _ in module.train_dataloader():
            pass
    assert len(calls) == decoded
