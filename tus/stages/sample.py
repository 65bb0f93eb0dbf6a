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

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import UNet2DModel
from tqdm import tqdm

from tus.data.images import UsageError, write_grayscale
from tus.data.manifest import load_manifest
from tus.data.pools import encoder_exclusion
from tus.data.seeding import derive_seed
from tus.data.synthetic import GENERATOR_FILE
from tus.methods.iddpm import DiffusionCheckpointError, UNetExport, latest_export, load_ema_from_checkpoint, load_unet_export, null_label
from tus.models.export import CONFIG_FILE, read_export_config
from tus.runs import RunLock, last_checkpoint, write_json_atomic
from tus.samplers import resolve_steps, sample_images
from tus.samplers.base import to_uint8
from tus.tracking import track_sample

SETTINGS_FILE = "sampling.json"
MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS = ("index", "seed", "sampler", "steps", "path", "sample_id")
CONDITIONAL_COLUMNS = ("label", "guidance")


def load_sampling_model(path: str | Path) -> tuple[UNet2DModel, UNetExport, Path]:
    """The EMA U-Net from an export (its folder, config.json or weights; an old .safetensors/.json), a Lightning
    .ckpt, or a run directory.

    A run directory uses its latest export when training finished, else ``checkpoints/last.ckpt``.
    Returns (unet in eval mode, its configs, the weights file actually read).
    """
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        source = latest_export(path) or last_checkpoint(path)
        if source is None:
            raise DiffusionCheckpointError(f"{path}: neither an export in export/ema_unet_step* nor checkpoints/last.ckpt found")
    elif not path.exists():
        raise DiffusionCheckpointError(f"{path}: --checkpoint not found")
    elif path.is_file() and path.suffix not in (".ckpt", ".safetensors", ".json"):
        raise DiffusionCheckpointError(f"{path}: --checkpoint must be an export (a folder, or .safetensors + .json), a Lightning .ckpt or a diffusion run folder")
    else:
        source = path
    if source.suffix == ".ckpt":
        unet, config = load_ema_from_checkpoint(source)
        return unet.eval(), config, source
    unet, config = load_unet_export(source)
    weights, _ = read_export_config(source)
    return unet.eval(), config, weights


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
                raise ValueError(f"{settings_path}: this folder was sampled with {key}={previous.get(key)!r}, not {value!r}; use a new --out folder for different settings")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps(settings, indent=2))


def manifest_indices(manifest: Path) -> set[int]:
    if not manifest.is_file():
        return set()
    with open(manifest, newline="") as handle:
        return {int(row["index"]) for row in csv.DictReader(handle)}


def class_labels(unet: UNet2DModel, label: int | None, labels_from: str | Path | None, guidance: float) -> tuple[list[int] | None, dict]:
    """The label sequence images cycle through (None: unconditional) and the settings that record it."""
    if label is not None and labels_from is not None:
        raise UsageError("give --label or --labels-from, not both")
    if guidance < 0:
        raise UsageError(f"--guidance must be >= 0, got {guidance}")
    if label is None and labels_from is None:
        if guidance:
            raise UsageError("--guidance needs --label or --labels-from (the class to guide towards)")
        return None, {}
    classes = null_label(unet)
    if classes is None:
        raise UsageError("--label/--labels-from need a class-conditional model (trained with unet.num_classes); this one is unconditional")
    if label is not None:
        if not 0 <= label < classes:
            raise UsageError(f"--label {label} is outside 0..{classes - 1}: the model knows {classes} classes")
        return [label], {"label": label, "guidance": guidance}
    frame = load_manifest(labels_from, require_labels=True, require_patients=False, decode_images=False)
    labels = frame["label"].astype(int).tolist()
    outside = [(row, y) for row, y in enumerate(labels) if not 0 <= y < classes]
    if outside:
        raise UsageError(f"--labels-from {labels_from}: row {outside[0][0] + 1} has label {outside[0][1]}, outside 0..{classes - 1} (the model's classes)")
    digest = hashlib.sha256(",".join(map(str, labels)).encode()).hexdigest()[:16]
    return labels, {"labels_from": str(Path(labels_from).resolve()), "labels_sha256": digest, "guidance": guidance}


def generator_record(source: Path) -> dict:
    """What ``generator.json`` says of the model that drew a folder: its weights and the labelled
    patients its training pool left out (the run's ``pool.json``; ``unknown`` when none is found
    above the weights), which fine-tuning checks before adding the samples to a fold's training."""
    source = Path(source).resolve()
    for folder in [source, *source.parents][:4]:
        pool = folder / "pool.json"
        if pool.is_file():
            report = json.loads(pool.read_text(encoding="utf-8"))
            return {"generator": str(source), "run_dir": str(folder), "exclusion": encoder_exclusion(report.get("excluded_labeled"))}
    return {"generator": str(source), "run_dir": None, "exclusion": {"mode": "unknown"}}


def write_generator_record(out_dir: Path, source: Path) -> None:
    """``out_dir/generator.json`` (:func:`generator_record`), written atomically, beside the samples."""
    write_json_atomic(out_dir / GENERATOR_FILE, generator_record(source))


def append_manifest_rows(manifest: Path, indices: Sequence[int], settings: dict, labels: Sequence[int] | None = None) -> None:
    """Rows for ``indices``; image i's label is ``labels[i % len(labels)]`` (conditional sampling)."""
    new_file = not manifest.is_file()
    columns = MANIFEST_COLUMNS + (CONDITIONAL_COLUMNS if labels is not None else ())
    with open(manifest, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new_file:
            writer.writeheader()
        for index in indices:
            conditional = {"label": labels[index % len(labels)], "guidance": settings["guidance"]} if labels is not None else {}
            writer.writerow(
                {
                    **conditional,
                    "index": index,
                    "seed": derive_seed(settings["seed"], index),
                    "sampler": settings["sampler"],
                    "steps": settings["steps"],
                    "path": image_name(index),
                    "sample_id": f"{settings['sampler']}{settings['steps']}-seed{settings['seed']}-{index:06d}",
                }
            )


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
    label: int | None = None,
    labels_from: str | Path | None = None,
    guidance: float = 0.0,
) -> Path:
    """Make sure ``out_dir`` holds images 0..n-1; returns the manifest path.

    ``label``/``labels_from`` and ``guidance``: class-conditional sampling (see the module's docstring)."""
    if n < 1 or batch_size < 1:
        raise UsageError(f"--n and --batch-size must be >= 1, got --n {n} and --batch-size {batch_size}")
    unet, export, source = load_sampling_model(checkpoint)
    labels, label_settings = class_labels(unet, label, labels_from, guidance)
    schedule = export.process.schedule()
    steps = resolve_steps(sampler, steps, schedule.num_timesteps)
    settings = {
        "checkpoint": str(source.resolve()),
        "model_step": export.step,
        "sampler": sampler,
        "steps": steps,
        "seed": seed,
        "precision": precision,
        "image_size": export.unet.sample_size,
        # Only when conditional: an unconditional folder's settings stay as they were (and continue).
        **label_settings,
    }
    out_dir = Path(out_dir)
    prepare_output(out_dir, settings)
    write_generator_record(out_dir, source)
    # One writer per output folder: a second `tus sample --out` on it is refused (holder's pid).
    with RunLock(out_dir):
        manifest = out_dir / MANIFEST_FILE
        listed = manifest_indices(manifest)
        present = {i for i in range(n) if (out_dir / image_name(i)).is_file()}
        # Images written by an interrupted call just before its manifest rows.
        append_manifest_rows(manifest, sorted(present - listed), settings, labels)
        missing = [i for i in range(n) if i not in present]
        device = pick_device(device)
        unet.to(device)
        # Batches sit on a fixed grid of indices, so a resumed call redraws the same batches.
        batches: dict[int, list[int]] = {}
        for index in missing:
            batches.setdefault(index // batch_size, []).append(index)
        with tqdm(total=n, initial=n - len(missing), unit="img", disable=not progress, desc=f"{sampler} {steps} steps") as bar:
            for indices in batches.values():
                batch_labels = None if labels is None else [labels[i % len(labels)] for i in indices]
                seeds = [derive_seed(seed, i) for i in indices]
                images = to_uint8(sample_images(unet, schedule, sampler, steps, seeds, device, precision, labels=batch_labels, guidance=guidance))
                for index, image in zip(indices, images):
                    final = out_dir / image_name(index)
                    partial = out_dir / f".{index:06d}.partial.png"
                    write_grayscale(partial, image)
                    os.replace(partial, final)
                append_manifest_rows(manifest, [i for i in indices if i not in listed], settings, labels)
                bar.update(len(indices))
        track_sample(out_dir, settings, source)
    return manifest
