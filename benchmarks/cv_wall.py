"""Wall time of a whole 3-fold CV through ``tus finetune-cv`` (a subprocess: start-up, data
loading, training, testing, exports, summary) against a plain PyTorch script doing the same
folds, epochs, augmentations and test-fold evaluation, also as a subprocess. Target: tus /
plain wall-time ratio (plain / tus) >= 0.9.

The plain script (benchmarks/plain_cv.py, which does not import Lightning) decodes each image
once into memory, trains the same model at the precision ``auto`` resolves to (tus.hardware),
and prints the test AUROC of each fold. It runs twice, in NCHW and in channels_last, and the
faster run is the baseline (which format wins on a CPU depends on the model and input size).
tus runs twice in a fresh cache folder: the first run decodes every image and times the two
memory formats (``channels_last: auto``), as a first run on a machine does; the later run
finds both in the cache, as every run after it does. Both ratios are printed.

    python benchmarks/cv_wall.py                      # 64 px ResNet-18, 12 epochs, 1 seed
    python benchmarks/cv_wall.py --epochs 2 --rounds 3  # start-up dominated
    python benchmarks/cv_wall.py --seeds 0 1 --patients 80
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_model, finetune_cv_overrides, phantom_workspace, scratch_cache


def tus_command(manifest: Path, output_root: Path, args) -> list[str]:
    """The ``tus finetune-cv`` command line."""
    return [sys.executable, "-m", "tus.cli", "finetune-cv", "--config", "finetune/cpu", *finetune_cv_overrides(manifest, output_root, args)]


def plain_command(manifest: Path, args, channels_last: bool) -> list[str]:
    """The plain script's command line (benchmarks/plain_cv.py)."""
    return [
        sys.executable,
        str(Path(__file__).with_name("plain_cv.py")),
        str(manifest),
        *(["--channels-last"] if channels_last else []),
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
    # finetune/cpu's epochs: with fewer, start-up (Python imports: ~4 s for the plain script,
    # ~5 s with Lightning) outweighs the training that the two are compared on.
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--patients", type=int, default=30, help="phantom patients (2-5 images each)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of every run; each keeps its fastest")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    print(f"machine: {cpu_model()}")
    print(f"3-fold CV x {len(args.seeds)} seed(s), {args.model} {args.image_size}px, {args.epochs} epochs, batch {args.batch_size}, best of {args.rounds} rounds")
    plain = dict.fromkeys(("NCHW", "channels_last"), float("inf"))
    tus = dict.fromkeys(("first", "later"), float("inf"))
    with phantom_workspace(args.patients, args.image_size) as (tmp, paths):
        manifest = paths.labeled_manifest
        for round_ in range(args.rounds):
            for name in plain:
                plain[name] = min(plain[name], timed(plain_command(manifest, args, channels_last=name == "channels_last"), repo))
            # A fresh, empty cache the subprocesses inherit: the first run decodes every image
            # (as the plain script does) and times the memory formats; the later run finds both.
            with scratch_cache():
                for name in tus:
                    tus[name] = min(tus[name], timed(tus_command(manifest, tmp / f"{name}{round_}", args), repo))
    for name, seconds in plain.items():
        print(f"plain script, {name:<13}: {seconds:7.1f} s")
    best = min(plain, key=plain.get)
    print(f"tus finetune-cv, first run : {tus['first']:7.1f} s  (empty cache: decodes, times memory formats)")
    print(f"tus finetune-cv, later run : {tus['later']:7.1f} s  (decoded images and format choice cached)")
    for name, seconds in tus.items():
        print(f"ratio best plain ({best}) / tus {name} run wall time = {plain[best] / seconds:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
