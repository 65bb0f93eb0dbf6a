"""What the throughput benchmarks share: the machine line, the plain-loop settings worth
trying on this hardware, a step timer for the tus Trainer, and the report.

"Best plain loop" means the fastest of fp32 NCHW, fp32 channels_last and (only where the
device runs bf16 natively, per :func:`tus.hardware.detect_caps`) bf16 autocast +
channels_last; bf16 on a CPU without AVX512-BF16/AMX is emulated (~100x slower) and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from tus.data.cache import CACHE_DIR_ENV
from tus.data.phantom import PhantomPaths, generate_phantom
from tus.hardware import cpu_model, detect_caps
from tus.runs import TrainerConfig, build_trainer


@dataclass(frozen=True)
class Setting:
    """A precision and memory format for the plain loop."""

    name: str
    bf16: bool
    channels_last: bool

    def autocast(self, device: torch.device):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def machine_line(device: torch.device) -> str:
    caps = detect_caps()
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    native = caps.cuda_bf16 if device.type == "cuda" else caps.cpu_native_bf16
    return f"machine: {cpu_model()}, {torch.get_num_threads()} torch thread(s){gpu}; torch {torch.__version__}; native bf16 on {device.type}: {native}"


def plain_settings(device: torch.device) -> list[Setting]:
    """The settings the plain loop is timed in on ``device``; prints which were skipped and why."""
    settings = [Setting("fp32 NCHW", False, False), Setting("fp32 channels_last", False, True)]
    caps = detect_caps()
    native = caps.cuda_bf16 if device.type == "cuda" else caps.cpu_native_bf16
    if native:
        settings += [Setting("bf16 NCHW", True, False), Setting("bf16 channels_last", True, True)]
    else:
        print(f"bf16 skipped: emulated on this {device.type} (no native bf16), ~100x slower than fp32")
    return settings


def timing_arguments(parser: argparse.ArgumentParser, *, image_size: int, batch_size: int, steps: int, warmup: int = 3) -> None:
    """The size, step-count and device flags every throughput benchmark takes."""
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps (after --warmup untimed ones)")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def scratch_cache() -> Iterator[Path]:
    """A temporary folder that is also tus's cache root for the duration: empty, so no decoded
    image or stored memory-format choice carries over from an earlier run or the user's cache
    (tus decodes and measures as a first run does). The cache setting is restored on exit."""
    previous = os.environ.get(CACHE_DIR_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[CACHE_DIR_ENV] = str(Path(tmp) / "cache")
        try:
            yield Path(tmp)
        finally:
            if previous is None:
                os.environ.pop(CACHE_DIR_ENV, None)
            else:
                os.environ[CACHE_DIR_ENV] = previous


@contextlib.contextmanager
def phantom_workspace(patients: int, image_size: int) -> Iterator[tuple[Path, PhantomPaths]]:
    """:func:`scratch_cache` with a phantom labelled set of ``patients`` patients in it."""
    with scratch_cache() as root:
        yield root, generate_phantom(root / "phantom", num_patients=patients, image_size=max(image_size, 64), pool_size=0, seed=0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - start


class StepTimer(Callback):
    """Wall time of the training steps after ``warmup`` (loader waits included)."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.start = self.end = self.train_start = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(pl_module.device)
        self.end = time.perf_counter()

    def seconds(self) -> float:
        return self.end - self.start

    def warmup_seconds(self) -> float:
        """Wall time of the untimed warmup steps (where torch.compile compiles)."""
        return self.start - self.train_start


def finetune_cv_overrides(manifest: Path, output_root: Path, args, folds: int = 3) -> list[str]:
    """The ``tus finetune-cv`` overrides every benchmark CV shares (on top of ``finetune/cpu``):
    data, seeds, folds, input size, batch, model and epochs from ``args``; no progress bar, W&B,
    loss recording or Grad-CAM, which the plain baselines do not do either."""
    return [
        f"--data.manifest={manifest}",
        f"--output_root={output_root}",
        f"--seeds=[{','.join(str(s) for s in args.seeds)}]",
        f"--data.num_folds={folds}",
        f"--data.image_size={args.image_size}",
        f"--data.batch_size={args.batch_size}",
        f"--model.name={args.model}",
        f"--trainer.max_epochs={args.epochs}",
        "--trainer.enable_progress_bar=false",
        "--logging.wandb=false",
        "--record_losses=false",
        "--gradcam.enabled=false",
    ]


def tus_trainer(run_dir: Path, device: torch.device, max_steps: int, timer: StepTimer, **options) -> L.Trainer:
    """A Trainer as the stages build it (tus.runs.build_trainer: precision 'auto', and the
    ChannelsLast callback of ``trainer.channels_last``, 'auto' unless ``options`` say otherwise);
    no loggers, no progress bar."""
    config = TrainerConfig(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="auto",
        max_steps=max_steps,
        enable_progress_bar=False,
        **options,
    )
    return build_trainer(config, run_dir, loggers=[], callbacks=[timer])


def report(tus_name: str, tus_images_per_s: float, plain: dict[str, float], target: float) -> None:
    """Images/s of each plain setting and of tus, and tus / the best plain setting."""
    for name, speed in plain.items():
        print(f"plain loop, {name:<20}: {speed:8.2f} images/s")
    best = max(plain, key=plain.get)
    print(f"tus, {tus_name:<26}: {tus_images_per_s:8.2f} images/s")
    print(f"ratio tus / best plain ({best}) = {tus_images_per_s / plain[best]:.3f} (target >= {target})")
