"""``tus sample``: draw synthetic images from a trained diffusion model into a new folder.

Samplers (all use the EMA U-Net):
- ``ddpm``: ancestral sampling with the learned variance over all training steps (the reference);
- ``respaced``: the same on a strided subset of K steps, with betas recomputed and the learned
  variance interpolated on the respaced schedule (improved-diffusion's ``timestep_respacing``);
- ``ddim``, ``dpm``: diffusers' ``DDIMScheduler`` (eta = 0) and ``DPMSolverMultistepScheduler``
  (DPM-Solver++ 2M) on the same cosine betas, using the noise half of the output. They are
  deterministic given the initial noise; on briefly trained models they are clearly worse
  than the respaced ancestral sampler (see benchmarks/sampling.py).

Each image i has its own generator seeded from (seed, i): its initial noise and every noise
draw of the ancestral chain come from it, so an image does not depend on the batch it was
drawn in. The output folder holds ``{i:06d}.png`` (8-bit grayscale), ``manifest.csv`` (index,
seed, sampler, steps, path, sample_id; loadable as a tus manifest) and ``sampling.json`` (the
settings). Calling again with the same folder continues: existing images are never
rewritten, only the missing indices are drawn, and different settings are refused.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from tqdm import tqdm

from tus.data.images import write_grayscale
from tus.losses.gaussian_diffusion import NoiseSchedule, p_mean_variance, respace, space_timesteps
from tus.modules.diffusion import (
    DiffusionCheckpointError,
    UNetExport,
    derive_seed,
    latest_export,
    load_ema_from_checkpoint,
    load_unet_export,
)
from tus.training import last_checkpoint

SAMPLERS = ("ddpm", "respaced", "ddim", "dpm")
DEFAULT_STEPS = {"respaced": 250, "ddim": 50, "dpm": 20}
SETTINGS_FILE = "sampling.json"
MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS = ("index", "seed", "sampler", "steps", "path", "sample_id")


def load_sampling_model(path: str | Path) -> tuple[UNet2DModel, UNetExport, Path]:
    """The EMA U-Net from an export (.safetensors/.json), a Lightning .ckpt, or a run directory.

    A run directory uses its latest export when training finished, else ``checkpoints/last.ckpt``.
    Returns (unet in eval mode, its configs, the weights file actually read).
    """
    path = Path(path)
    if path.is_dir():
        source = latest_export(path) or last_checkpoint(path)
        if source is None:
            raise DiffusionCheckpointError(f"{path}: neither export/ema_unet_step*.safetensors nor checkpoints/last.ckpt found")
    else:
        source = path
    unet, config = load_ema_from_checkpoint(source) if source.suffix == ".ckpt" else load_unet_export(source)
    return unet.eval(), config, source.with_suffix(".safetensors") if source.suffix == ".json" else source


def resolve_steps(sampler: str, steps: int | None, num_timesteps: int) -> int:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    if sampler == "ddpm":
        if steps not in (None, num_timesteps):
            raise ValueError(f"the ddpm sampler runs all {num_timesteps} steps, not {steps}; the respaced sampler takes fewer")
        return num_timesteps
    steps = DEFAULT_STEPS[sampler] if steps is None else steps
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"{sampler} steps must be in [1, {num_timesteps}], got {steps}")
    return steps


def initial_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One standard-normal draw per image, each from its own (CPU) generator."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def ancestral_sample(
    unet: UNet2DModel, schedule: NoiseSchedule, generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """x_T ~ N(0, I), then x_{t-1} ~ p(x_{t-1} | x_t) with the learned variance, down to x_0."""
    x = initial_noise(generators, shape, device)
    for index in reversed(range(schedule.num_timesteps)):
        t = torch.full((len(generators),), index, device=device, dtype=torch.long)
        model_t = torch.full_like(t, int(schedule.model_timesteps[index]))
        output = unet(x, model_t).sample.float()
        prediction = p_mean_variance(schedule, output, x, t, clip_denoised=True)
        if index == 0:
            x = prediction.mean
        else:
            x = prediction.mean + torch.exp(0.5 * prediction.log_variance) * initial_noise(generators, shape, device)
    return x


def diffusers_scheduler(sampler: str, schedule: NoiseSchedule) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """A diffusers solver on the model's own (cosine) betas; x0 estimates are clipped to [-1, 1].

    Steps are "leading" (t = 0, k, 2k, ..., as improved-diffusion's ``ddimK`` respacing), so
    a short chain does not start at t = T - 1, where the clipped cosine schedule leaves
    sqrt(alpha_bar) ~ 5e-4 and the first x0 estimate multiplies the noise-prediction error
    by ~2000 (on the benchmark's small model, "leading" was closer to DDPM-1000 than
    "trailing" at 20 and 50 steps).
    """
    betas = schedule.betas.numpy()
    if sampler == "ddim":
        return DDIMScheduler(
            num_train_timesteps=schedule.num_timesteps, trained_betas=betas, clip_sample=True, timestep_spacing="leading",
        )
    return DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.num_timesteps,
        trained_betas=betas,
        algorithm_type="dpmsolver++",
        solver_order=2,
        # With sample_max_value 1 dynamic thresholding is a plain clip of x0 to [-1, 1].
        thresholding=True,
        sample_max_value=1.0,
        # The cosine schedule's log-SNR diverges at t = T; diffusers' advice is to clip it.
        lambda_min_clipped=-5.1,
        timestep_spacing="leading",
    )


def solver_sample(
    unet: UNet2DModel,
    sampler: str,
    schedule: NoiseSchedule,
    steps: int,
    generators: Sequence[torch.Generator],
    shape: tuple[int, ...],
    device: torch.device,
) -> torch.Tensor:
    scheduler = diffusers_scheduler(sampler, schedule)
    scheduler.set_timesteps(steps, device=device)
    x = initial_noise(generators, shape, device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = unet(scheduler.scale_model_input(x, t), t).sample.float()
        x = scheduler.step(output[:, : shape[0]], t, x).prev_sample
    return x


@torch.no_grad()
def sample_images(
    unet: UNet2DModel,
    schedule: NoiseSchedule,
    sampler: str,
    steps: int,
    seeds: Sequence[int],
    device: torch.device | str = "cpu",
    precision: str = "32",
) -> torch.Tensor:
    """Images in [-1, 1], shape (len(seeds), C, H, W): one per seed, independent of batching."""
    device = torch.device(device)
    steps = resolve_steps(sampler, steps, schedule.num_timesteps)
    config = unet.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    with autocast:
        if sampler in ("ddpm", "respaced"):
            chain = schedule if steps == schedule.num_timesteps else respace(schedule, space_timesteps(schedule.num_timesteps, steps))
            images = ancestral_sample(unet, chain, generators, shape, device)
        else:
            images = solver_sample(unet, sampler, schedule, steps, generators, shape, device)
    return images.float().clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (B, 1, H, W) -> uint8 (B, H, W), rounding to the nearest level."""
    return ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare_output(out_dir: Path, settings: dict) -> None:
    """Create ``out_dir`` with its settings, or check that an existing one was sampled the same way."""
    settings_path = out_dir / SETTINGS_FILE
    if out_dir.exists() and any(out_dir.iterdir()):
        if not settings_path.is_file():
            raise FileExistsError(f"{out_dir}: exists and is not a tus sample folder (no {SETTINGS_FILE}); use a new --out")
        previous = json.loads(settings_path.read_text())
        for key, value in settings.items():
            if previous.get(key) != value:
                raise ValueError(
                    f"{settings_path}: this folder was sampled with {key}={previous.get(key)!r}, not {value!r}; "
                    "use a new --out folder for different settings"
                )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps(settings, indent=2))


def manifest_indices(manifest: Path) -> set[int]:
    if not manifest.is_file():
        return set()
    with open(manifest, newline="") as handle:
        return {int(row["index"]) for row in csv.DictReader(handle)}


def append_manifest_rows(manifest: Path, indices: Sequence[int], settings: dict) -> None:
    new_file = not manifest.is_file()
    with open(manifest, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        if new_file:
            writer.writeheader()
        for index in indices:
            writer.writerow({
                "index": index,
                "seed": derive_seed(settings["seed"], index),
                "sampler": settings["sampler"],
                "steps": settings["steps"],
                "path": image_name(index),
                "sample_id": f"{settings['sampler']}{settings['steps']}-seed{settings['seed']}-{index:06d}",
            })


def generate(
    checkpoint: str | Path,
    out_dir: str | Path,
    n: int,
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "32",
    progress: bool = True,
) -> Path:
    """Make sure ``out_dir`` holds images 0..n-1; returns the manifest path."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"--n and --batch-size must be >= 1, got {n} and {batch_size}")
    unet, export, source = load_sampling_model(checkpoint)
    schedule = export.process.schedule()
    steps = resolve_steps(sampler, steps, schedule.num_timesteps)
    settings = {
        "checkpoint": str(source.resolve()), "model_step": export.step, "sampler": sampler, "steps": steps,
        "seed": seed, "precision": precision, "image_size": export.unet.sample_size,
    }
    out_dir = Path(out_dir)
    prepare_output(out_dir, settings)
    manifest = out_dir / MANIFEST_FILE
    listed = manifest_indices(manifest)
    present = {i for i in range(n) if (out_dir / image_name(i)).is_file()}
    # Images written by an interrupted call just before its manifest rows.
    append_manifest_rows(manifest, sorted(present - listed), settings)
    missing = [i for i in range(n) if i not in present]
    device = pick_device(device)
    unet.to(device)
    # Batches sit on a fixed grid of indices, so a resumed call redraws the same batches.
    batches: dict[int, list[int]] = {}
    for index in missing:
        batches.setdefault(index // batch_size, []).append(index)
    with tqdm(total=n, initial=n - len(missing), unit="img", disable=not progress, desc=f"{sampler} {steps} steps") as bar:
        for indices in batches.values():
            images = to_uint8(sample_images(
                unet, schedule, sampler, steps, [derive_seed(seed, i) for i in indices], device, precision
            ))
            for index, image in zip(indices, images):
                final = out_dir / image_name(index)
                partial = out_dir / f".{index:06d}.partial.png"
                write_grayscale(partial, image)
                os.replace(partial, final)
            append_manifest_rows(manifest, [i for i in indices if i not in listed], settings)
            bar.update(len(indices))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tus sample", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="export .safetensors, Lightning .ckpt, or a diffusion run dir")
    parser.add_argument("--n", type=int, required=True, help="number of images the folder should hold")
    parser.add_argument("--out", required=True, help="output folder (new, or one to continue)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--steps", type=int, default=None, help=f"steps (defaults: ddpm all, {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    manifest = generate(
        args.checkpoint, args.out, args.n, sampler=args.sampler, steps=args.steps, seed=args.seed,
        batch_size=args.batch_size, device=args.device, precision=args.precision, progress=not args.no_progress,
    )
    print(f"{args.n} images in {manifest.parent} (manifest: {manifest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
