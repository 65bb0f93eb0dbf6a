"""A plain PyTorch fine-tuning loop: the reference that tus' fine-tuning recipes are measured against.

No Lightning and no tus training code: a timm backbone with a 2-class head, AdamW with a
one-cycle learning-rate schedule (Smith & Topin, "Super-convergence", 2017;
``torch.optim.lr_scheduler.OneCycleLR``), channels_last, a class-balanced sampler, and the
same images, folds and augmentations as tus (``tus.data.transforms.finetune_train_transform``),
so a difference between the two is a difference of recipe, not of data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import timm
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from tus.data.datasets import ManifestDataset
from tus.data.transforms import AugmentConfig, eval_transform, finetune_train_transform


@dataclass
class PlainConfig:
    """The plain loop's recipe (one learning rate for every parameter, as a plain script would)."""

    model: str = "resnet10t"
    image_size: int = 64
    batch_size: int = 64
    epochs: int = 10
    lr: float = 3e-3
    weight_decay: float = 0.05
    # OneCycleLR's rising phase (torch's default 0.3 of the steps).
    pct_start: float = 0.3
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def class_balanced_sample_weights(labels: np.ndarray) -> np.ndarray:
    """Weight 1 / (count of the image's class): every class is drawn equally often on average."""
    counts = np.bincount(labels)
    return 1.0 / counts[labels]


def balanced_augmented_loader(
    images: Sequence[np.ndarray], labels: np.ndarray, augment: Callable[[np.ndarray], torch.Tensor], batch_size: int, *, drop_last: bool, generator: torch.Generator | None = None
) -> DataLoader:
    """How a hand-written script feeds its model: batches of (augmented images, labels) drawn by a
    class-balanced WeightedRandomSampler from ``images`` decoded into memory, augmented and
    collated on the calling thread."""
    sampler = WeightedRandomSampler(class_balanced_sample_weights(labels).tolist(), len(labels), replacement=True, generator=generator)
    return DataLoader(
        range(len(labels)),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=lambda rows: (torch.stack([augment(images[i]) for i in rows]), torch.as_tensor(labels[rows])),
    )


def train_and_test(config: PlainConfig, frame: pd.DataFrame, folds: np.ndarray, fold: int, seed: int) -> dict:
    """Train on every fold but ``fold`` for ``config.epochs`` epochs, test the last epoch on ``fold``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    train_frame, test_frame = frame[folds != fold], frame[folds == fold]
    train_set = ManifestDataset(train_frame, finetune_train_transform(config.augment, seed=seed), image_size=config.image_size)
    test_set = ManifestDataset(test_frame, eval_transform(), image_size=config.image_size)
    generator = torch.Generator().manual_seed(seed)
    sampler = WeightedRandomSampler(class_balanced_sample_weights(train_set.labels).tolist(), len(train_set), replacement=True, generator=generator)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=len(train_set) > config.batch_size)
    model = timm.create_model(config.model, pretrained=False, num_classes=2, in_chans=1).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.epochs * len(train_loader), pct_start=config.pct_start, cycle_momentum=False)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(config.epochs):
        model.train()
        for batch in train_loader:
            images = batch["image"].to(memory_format=torch.channels_last)
            loss = loss_fn(model(images), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    probabilities, labels = [], []
    with torch.no_grad():
        for batch in DataLoader(test_set, batch_size=256):
            probabilities.append(model(batch["image"].to(memory_format=torch.channels_last)).softmax(1)[:, 1])
            labels.append(batch["label"])
    probability = torch.cat(probabilities).numpy()
    label = torch.cat(labels).numpy()
    # Threshold 0.5 on the positive-class probability, as tus' test metrics (torchmetrics Binary*).
    predicted = (probability >= 0.5).astype(int)
    return {
        "fold": fold,
        "seed": seed,
        "accuracy": float(accuracy_score(label, predicted)),
        "f1": float(f1_score(label, predicted, zero_division=0)),
        "precision": float(precision_score(label, predicted, zero_division=0)),
        "recall": float(recall_score(label, predicted, zero_division=0)),
        "auroc": float(roc_auc_score(label, probability)),
    }
