"""The plain PyTorch 3-fold CV that ``benchmarks/cv_wall.py`` times ``tus finetune-cv`` against:
the same folds, class-balanced sampler, augmentations, model, optimiser, schedule and epochs,
each image decoded once into memory, the test fold evaluated after training; no framework.

It imports only what a hand-written script would (torch, timm, albumentations through
tus.data.transforms, scikit-learn), never Lightning: importing that is part of what tus costs.
Prints each fold's test AUROC.

    python benchmarks/plain_cv.py MANIFEST [--channels-last] [--model resnet18] [--image-size 64] [--epochs 2]
    python benchmarks/plain_cv.py MANIFEST --max-steps 1   # one training step per fold: the fixed costs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from plain_finetune import balanced_augmented_loader
from sklearn.metrics import roc_auc_score

from tus.data.cache import resize_square
from tus.data.folds import assign_folds
from tus.data.images import read_grayscale
from tus.data.manifest import load_manifest
from tus.data.transforms import AugmentConfig, eval_transform, finetune_train_transform
from tus.hardware import keep_opencv_on_calling_thread, resolve_precision


def plain_cv(manifest: Path, args: argparse.Namespace) -> None:
    frame = load_manifest(manifest, require_labels=True, num_folds=3)
    folds = assign_folds(frame, 3, 0)
    images = [resize_square(read_grayscale(p), args.image_size) for p in frame["abs_path"]]
    labels = frame["label"].astype(int).to_numpy()
    bf16 = resolve_precision("auto", "cpu").startswith("bf16")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    keep_opencv_on_calling_thread()  # augmentation and training share this process's cores
    # finetune/cpu's recipe: AdamW, peak 3e-3 for backbone and head, weight decay 0.05,
    # one-cycle over every step; the model is the same timm network with its 2-class head.
    lr, weight_decay = 3e-3, 0.05
    for seed in args.seeds:
        for fold in range(3):
            torch.manual_seed(seed)
            train = np.flatnonzero(folds != fold)
            test = np.flatnonzero(folds == fold)
            transform = finetune_train_transform(AugmentConfig(), seed=seed)
            model = timm.create_model(args.model, pretrained=False, num_classes=2, in_chans=1).to(memory_format=memory_format)
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
            loader = balanced_augmented_loader([images[i] for i in train], labels[train], transform, args.batch_size, drop_last=len(train) > args.batch_size)
            # --max-steps caps the run as tus's trainer.max_steps does (the schedule spans the steps taken).
            total_steps = args.epochs * len(loader) if args.max_steps < 0 else min(args.max_steps, args.epochs * len(loader))
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
            model.train()
            steps = 0
            for _ in range(args.epochs):
                if steps == total_steps:
                    break
                for x, y in loader:
                    if steps == total_steps:
                        break
                    steps += 1
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = F.cross_entropy(model(x.contiguous(memory_format=memory_format)).float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
            model.eval()
            evaluate = eval_transform()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                x = torch.stack([evaluate(images[i]) for i in test]).contiguous(memory_format=memory_format)
                probability = model(x).float().softmax(1)[:, 1].numpy()
            print(f"fold {fold} seed {seed}: test AUROC {roc_auc_score(labels[test], probability):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-steps", type=int, default=-1, help="training steps per fold at most (-1: every step of --epochs)")
    args = parser.parse_args()
    plain_cv(args.manifest, args)


if __name__ == "__main__":
    main()
