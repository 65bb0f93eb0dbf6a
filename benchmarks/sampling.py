"""Seconds per image and sample quality of each ``tus sample`` sampler, against 1000-step DDPM.

Trains a small diffusion model briefly (``tus diffusion`` with experiments/diffusion/cpu.yaml,
narrowed) on real ultrasound images (../shared/data/busi by default, or ``--data MANIFEST``),
then draws the same seeds with every sampler through :func:`tus.stages.sample.generate`
(the ``tus sample`` code path, PNG writing included). Reports, per sampler:

- seconds per image and the speed-up over the reference sampler (ancestral DDPM, all 1000
  steps, learned variance), both measured in this run on this machine;
- FD vs DDPM-1000 and FD vs real: a Frechet distance between Gaussian fits of 16 hand-made
  **pixel statistics** per image (8-bin intensity histogram, mean, std, mean |dx|, mean |dy|,
  4 bands of the radially averaged log power spectrum). This is *not* the Inception FID: it is
  cheap and meaningful with tens of images, and sees contrast, texture and speckle scale,
  not anatomy. The real-vs-real value (two disjoint halves of the real set, same sizes)
  is the noise floor of the FD at this sample count.

    python benchmarks/sampling.py                         # ~20 min on 2 busy CPU cores
    python benchmarks/sampling.py --data my/manifest.csv --train-steps 1000 --num-images 96
    python benchmarks/sampling.py --model runs/<diffusion run> --data its/manifest.csv   # no training
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_statistics_to_metric,
)

from tus.config import load_config
from tus.data.cache import resize_square
from tus.data.images import content_hash, read_grayscale
from tus.data.manifest import read_manifest, write_manifest
from tus.methods.iddpm import latest_export
from tus.runs import new_run_dir
from tus.stages.diffusion import DiffusionConfig, run_diffusion
from tus.stages.sample import generate, load_sampling_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "busi" / "manifest.csv"
SAMPLERS = [("ddpm", 1000), ("respaced", 250), ("respaced", 100), ("respaced", 50), ("ddim", 50), ("ddim", 20), ("dpm", 20), ("dpm", 10)]


def pixel_statistics(images: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 -> (N, 16) float64: histogram, mean, std, gradients, spectrum bands."""
    x = images.astype(np.float64) / 255.0
    histogram = np.stack([np.histogram(image, bins=8, range=(0, 1))[0] for image in x]) / x[0].size
    gradients = np.stack([np.abs(np.diff(x, axis=2)).mean((1, 2)), np.abs(np.diff(x, axis=1)).mean((1, 2))], axis=1)
    power = np.abs(np.fft.fftshift(np.fft.fft2(x - x.mean((1, 2), keepdims=True)), axes=(1, 2))) ** 2
    size = x.shape[1]
    yy, xx = np.mgrid[:size, :size] - size // 2
    radius = np.hypot(yy, xx) / (size / 2)
    bands = [(0.0, 0.125), (0.125, 0.25), (0.25, 0.5), (0.5, 1.0)]
    spectrum = np.stack([np.log1p(power[:, (radius >= lo) & (radius < hi)].mean(1)) for lo, hi in bands], axis=1)
    return np.concatenate([histogram, x.mean((1, 2))[:, None], x.std((1, 2))[:, None], gradients, spectrum], axis=1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    statistics = [fid_features_to_statistics(torch.from_numpy(f)) for f in (a, b)]
    return float(fid_statistics_to_metric(*statistics, verbose=False)[KEY_METRIC_FID])


def folder_images(folder: Path) -> np.ndarray:
    return np.stack([read_grayscale(p) for p in sorted(folder.glob("*.png"))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="manifest of real training images")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks", help="a new folder is made under it")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=800)
    parser.add_argument("--model", type=Path, help="benchmark this trained model (run dir or export) instead of training one")
    parser.add_argument("--num-images", type=int, default=48, help="images per sampler (one batch)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for a tiny model on a shared box)")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: manifest not found; pass --data MANIFEST")
    torch.set_num_threads(args.threads)
    out = new_run_dir(args.out, "sampling")
    # Exact duplicate files (BUSI has one) fail the manifest's cross-patient leak check.
    frame = read_manifest(args.data)
    frame = frame.loc[~frame["abs_path"].map(content_hash).duplicated()].drop(columns=["line"])
    train_manifest = write_manifest(frame, out / "train_manifest.csv")

    if args.model is None:
        config = load_config(
            DiffusionConfig,
            REPO / "experiments" / "diffusion" / "cpu.yaml",
            [
                f"data.sources=[{{manifest: {train_manifest}}}]",
                f"output_root={out}",
                f"data.image_size={args.image_size}",
                f"unet.sample_size={args.image_size}",
                f"unet.base_channels={args.base_channels}",
                "unet.attention_head_dim=32",
                f"trainer.max_steps={args.train_steps}",
                f"data.steps_per_epoch={args.train_steps}",
                "samples.every_n_steps=0",
                "trainer.enable_progress_bar=false",
                "logging.wandb=false",
                "optim.lr=2e-4",
            ],
        )
        start = time.perf_counter()
        model = latest_export(run_diffusion(config))
        train_seconds = time.perf_counter() - start
        model_note = f"{args.image_size} px, width {args.base_channels}, {args.train_steps} training steps ({train_seconds:.0f} s)"
    else:
        model = args.model
        _, export, _ = load_sampling_model(model)
        args.image_size = export.unet.sample_size
        train_seconds = None
        model_note = f"{model} ({args.image_size} px, width {export.unet.base_channels}, step {export.step})"

    real = np.stack([resize_square(read_grayscale(p), args.image_size) for p in frame["abs_path"]])
    real_features = pixel_statistics(real)
    halves = np.random.default_rng(0).permutation(len(real))
    n = min(args.num_images, len(real) // 2)
    noise_floor = frechet_distance(real_features[halves[:n]], real_features[halves[n : 2 * n]])

    rows = []
    for sampler, steps in SAMPLERS:
        folder = out / "samples" / f"{sampler}{steps}"
        start = time.perf_counter()
        generate(model, folder, args.num_images, sampler=sampler, steps=steps, seed=0, batch_size=args.num_images, device="cpu", progress=False)
        seconds = (time.perf_counter() - start) / args.num_images
        rows.append({"sampler": sampler, "steps": steps, "seconds_per_image": seconds, "features": pixel_statistics(folder_images(folder))})
    reference = rows[0]
    for row in rows:
        row["speedup_vs_ddpm1000"] = reference["seconds_per_image"] / row["seconds_per_image"]
        row["fd_vs_ddpm1000"] = max(0.0, frechet_distance(reference["features"], row["features"]))
        row["fd_vs_real"] = frechet_distance(real_features, row["features"])

    print(f"model: {model_note}; real images: {len(real)} of {args.data}")
    print(f"{args.num_images} images per sampler, torch threads {args.threads}; FD = Frechet distance of 16 pixel statistics (not Inception FID)")
    print(f"FD noise floor (real vs real, {n} vs {n} images): {noise_floor:.4f}")
    print(f"{'sampler':<10}{'steps':>6}{'s/image':>10}{'speed-up':>10}{'FD vs DDPM-1000':>17}{'FD vs real':>12}")
    for row in rows:
        print(f"{row['sampler']:<10}{row['steps']:>6}{row['seconds_per_image']:>10.3f}{row['speedup_vs_ddpm1000']:>9.1f}x{row['fd_vs_ddpm1000']:>17.4f}{row['fd_vs_real']:>12.4f}")
    report = {
        "data": str(args.data),
        "model": model_note,
        "image_size": args.image_size,
        "train_seconds": train_seconds,
        "num_images": args.num_images,
        "threads": args.threads,
        "fd_features": "16 pixel statistics (not Inception)",
        "fd_noise_floor_real_vs_real": noise_floor,
        "samplers": [{k: v for k, v in row.items() if k != "features"} for row in rows],
    }
    (out / "sampling_benchmark.json").write_text(json.dumps(report, indent=2))
    print(f"report: {out / 'sampling_benchmark.json'}")


if __name__ == "__main__":
    main()
