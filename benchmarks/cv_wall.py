"""Wall time of a whole 3-fold CV through ``tus finetune-cv`` (a subprocess: start-up, data
loading, training, testing, exports, summary) against a plain PyTorch script doing the same
folds, epochs, augmentations and test-fold evaluation, also as a subprocess. Target: tus /
plain wall-time ratio (plain / tus) >= 0.9.

The plain script decodes each image once into memory, trains the same model at the precision
``auto`` resolves to (tus.hardware), and prints the test AUROC of each fold. It runs twice, in
NCHW and in channels_last, and the faster run is the baseline (which format wins on a CPU
depends on the model and input size). tus runs with an empty cache folder, so its wall time
includes decoding every image and timing the two memory formats once (``channels_last: auto``).

    python benchmarks/cv_wall.py                      # 64 px ResNet-18, 2 epochs, 1 seed
    python benchmarks/cv_wall.py --epochs 12 --seeds 0 1 --patients 80
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, finetune_cv_overrides


def tus_command(manifest: Path, output_root: Path, args) -> list[str]:
    """The ``tus finetune-cv`` command line."""
    return [sys.executable, "-m", "tus.cli", "finetune-cv", "--config", "finetune/cpu", *finetune_cv_overrides(manifest, output_root, args)]


def plain_command(manifest: Path, args, channels_last: bool) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--plain-worker",
        str(manifest),
        *(["--plain-channels-last"] if channels_last else []),
        "--model",
        args.model,
        "--image-size",
        str(args.image_size),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--seeds",
        *map(str, args.seeds),
    ]


def plain_cv(manifest: Path, args) -> None:
    """The plain script: same folds, sampler, augmentation, optimiser and epochs; no framework loop."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score
    from torch.utils.data import DataLoader, WeightedRandomSampler

    from tus.data.cache import resize_square
    from tus.data.folds import assign_folds
    from tus.data.images import read_grayscale
    from tus.data.manifest import load_manifest
    from tus.data.transforms import (
        AugmentConfig,
        eval_transform,
        finetune_train_transform,
    )
    from tus.hardware import keep_opencv_on_calling_thread, resolve_precision
    from tus.methods.classifier import FineTuneModule, FineTuneOptimConfig
    from tus.models.backbones import BackboneConfig

    frame = load_manifest(manifest, require_labels=True, num_folds=3)
    folds = assign_folds(frame, 3, 0)
    images = [resize_square(read_grayscale(p), args.image_size) for p in frame["abs_path"]]
    labels = frame["label"].astype(int).to_numpy()
    bf16 = resolve_precision("auto", "cpu").startswith("bf16")
    memory_format = torch.channels_last if args.plain_channels_last else torch.contiguous_format
    keep_opencv_on_calling_thread()  # augmentation and training share this process's cores
    # finetune/cpu.yaml's learning rates, so both runs train the same way.
    # finetune/cpu's recipe: AdamW, peak 3e-3, weight decay 0.05, one-cycle over every step.
    optim = FineTuneOptimConfig(lr_backbone=3e-3, lr_head=3e-3, weight_decay=0.05, schedule="onecycle")
    for seed in args.seeds:
        for fold in range(3):
            torch.manual_seed(seed)
            train = np.flatnonzero(folds != fold)
            test = np.flatnonzero(folds == fold)
            transform = finetune_train_transform(AugmentConfig(), seed=seed)
            model = FineTuneModule(BackboneConfig(name=args.model, init="scratch"), optim).to(memory_format=memory_format)
            optimizer = torch.optim.AdamW(model.param_groups(), weight_decay=optim.weight_decay, fused=True)
            counts = np.bincount(labels[train])
            sampler = WeightedRandomSampler((1.0 / counts[labels[train]]).tolist(), len(train), replacement=True)
            loader = DataLoader(
                [(i, int(labels[i])) for i in train],
                batch_size=args.batch_size,
                sampler=sampler,
                drop_last=len(train) > args.batch_size,
                collate_fn=lambda rows, augment=transform: (torch.stack([augment(images[i]) for i, _ in rows]), torch.tensor([y for _, y in rows])),
            )
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=args.epochs * len(loader))
            model.train()
            for _ in range(args.epochs):
                for x, y in loader:
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


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, check=False, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--patients", type=int, default=30, help="phantom patients (2 images each)")
    parser.add_argument("--plain-worker", metavar="MANIFEST", help=argparse.SUPPRESS)
    parser.add_argument("--plain-channels-last", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        plain_cv(Path(args.plain_worker), args)
        return
    from tus.data.phantom import generate_phantom

    repo = Path(__file__).resolve().parents[1]
    print(f"machine: {cpu_model()}")
    print(f"3-fold CV x {len(args.seeds)} seed(s), {args.model} {args.image_size}px, {args.epochs} epochs, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = generate_phantom(Path(tmp) / "phantom", num_patients=args.patients, image_size=max(args.image_size, 64), pool_size=0, seed=0)
        manifest = paths.labeled_manifest
        # A fresh, empty disk cache: tus decodes as much as the plain script does.
        os.environ["TUS_CACHE_DIR"] = str(Path(tmp) / "cache")
        plain = {name: timed(plain_command(manifest, args, channels_last), repo) for name, channels_last in (("NCHW", False), ("channels_last", True))}
        tus = timed(tus_command(manifest, Path(tmp) / "runs", args), repo)
    for name, seconds in plain.items():
        print(f"plain script, {name:<13}: {seconds:7.1f} s")
    best = min(plain, key=plain.get)
    print(f"tus finetune-cv            : {tus:7.1f} s")
    print(f"ratio best plain ({best}) / tus wall time = {plain[best] / tus:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
