"""``tus diffusion``: train the improved DDPM on a pool of ultrasound images.

A run directory holds ``config.yaml``, ``metrics.csv`` (train/loss, train/mse, train/vlb;
a resumed run appends to it),
``checkpoints/last.ckpt`` (written every ``data.steps_per_epoch`` steps, with the EMA and the
step, so ``--resume RUN_DIR`` continues it exactly), ``sample_grids/step_XXXXXXX.png`` (grids
drawn with the EMA weights, also logged to W&B) and, when training ends,
``export/ema_unet_stepXXXXXXX.safetensors`` + ``.json``: the EMA U-Net that ``tus sample``
reads without Lightning.

Images come from the manifests/folders of ``data.sources`` (labels ignored), resized to
``data.image_size`` and scaled to [-1, 1]; horizontal flips are drawn inside the training
step so that they, like the timesteps and the noise, replay identically after a resume.
An "epoch" here is just ``data.steps_per_epoch`` steps of batches drawn with replacement:
the checkpoint period (a checkpoint at an epoch end resumes exactly; Lightning cannot resume
plain dataloaders mid-epoch).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.utils import make_grid

from tus.config import load_config, save_config, to_dict
from tus.data.datamodules import ImagePoolDataModule, ImageSourceConfig
from tus.data.images import write_grayscale
from tus.modules.diffusion import (
    DiffusionModule,
    EmaConfig,
    OptimConfig,
    ProcessConfig,
    UNetConfig,
    UNetExport,
    derive_seed,
    export_stem,
    save_unet_export,
)
from tus.synthetic.sampling import resolve_steps, sample_images, to_uint8
from tus.training import LoggingConfig, TrainerConfig, build_loggers, build_trainer, last_checkpoint, resolve_run_dir

# Lightning's "ddp" strategy re-runs the command in each worker process; they find the run
# directory the launching process created here instead of each making a new one.
RUN_DIR_ENV = "TUS_DIFFUSION_RUN_DIR"


@dataclass
class DiffusionDataConfig:
    sources: list[ImageSourceConfig] = field(
        default_factory=lambda: [ImageSourceConfig(manifest="data/phantom/labeled/manifest.csv")]
    )
    image_size: int = 256
    batch_size: int = 16
    num_workers: int = 2
    cache_images: bool = True
    hflip: bool = True
    # Optimiser steps per "epoch": checkpoints are written at epoch ends only, where a
    # resume replays the same draws as an uninterrupted run.
    steps_per_epoch: int = 1000


@dataclass
class SampleGridConfig:
    """Grids of EMA samples written (and logged) during training; every_n_steps 0 turns them off."""

    every_n_steps: int = 10000
    num_images: int = 16
    sampler: Literal["ddpm", "respaced", "ddim", "dpm"] = "respaced"
    steps: int = 50
    seed: int = 0


def _default_trainer() -> TrainerConfig:
    return TrainerConfig(max_epochs=-1, max_steps=300_000, precision="bf16-mixed", log_every_n_steps=50)


@dataclass
class DiffusionConfig:
    name: str = "diffusion"
    output_root: str = "runs"
    seed: int = 0
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    samples: SampleGridConfig = field(default_factory=SampleGridConfig)
    trainer: TrainerConfig = field(default_factory=_default_trainer)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def to_signed_unit(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) -> float (1, H, W) in [-1, 1], the range the diffusion process assumes."""
    return torch.from_numpy(image).float().div(127.5).sub(1.0).unsqueeze(0)


class EpochWeightedSampler(DistributedSampler):
    """Weighted draws with replacement, redrawn reproducibly from (seed, epoch), split over ranks.

    Being a ``DistributedSampler``, Lightning neither wraps it nor forgets to call
    ``set_epoch``, so the draws of an epoch are the same whether or not the run was resumed.
    """

    def __init__(self, dataset: Dataset, weights: np.ndarray, samples_per_rank: int, seed: int, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.samples_per_rank = samples_per_rank

    def __iter__(self):
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        draws = torch.multinomial(self.weights, self.samples_per_rank * self.num_replicas, replacement=True, generator=generator)
        return iter(draws[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.samples_per_rank


class DiffusionDataModule(ImagePoolDataModule):
    """The image pool in [-1, 1]; an epoch is ``steps_per_epoch`` optimiser steps on every rank."""

    def __init__(self, config: DiffusionDataConfig, seed: int):
        super().__init__(
            config.sources, to_signed_unit, image_size=config.image_size, batch_size=config.batch_size,
            num_workers=config.num_workers, cache_images=config.cache_images, seed=seed,
        )
        self.steps_per_epoch = config.steps_per_epoch

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world_size, rank, accumulate = (
            (trainer.world_size, trainer.global_rank, trainer.accumulate_grad_batches) if trainer else (1, 0, 1)
        )
        samples = self.steps_per_epoch * accumulate * self.batch_size
        sampler = EpochWeightedSampler(self.dataset, self.sample_weights(), samples, self.seed, world_size, rank)
        return DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, drop_last=True,
        )


def save_sample_grid(module: DiffusionModule, config: SampleGridConfig, path: Path) -> np.ndarray:
    """Draw ``config.num_images`` EMA samples (fixed seeds, so grids compare across steps) into a PNG grid."""
    ema = module.ema.module
    was_training = ema.training
    ema.eval()
    seeds = [derive_seed(config.seed, i) for i in range(config.num_images)]
    images = sample_images(ema, module.schedule, config.sampler, config.steps, seeds, module.device)
    ema.train(was_training)
    grid = make_grid(images, nrow=math.ceil(math.sqrt(len(seeds))), padding=2, pad_value=-1.0)
    pixels = to_uint8(grid[None, :1])[0]
    write_grayscale(path, pixels)
    return pixels


class SampleGridCallback(Callback):
    """Every ``every_n_steps`` optimiser steps and at the end, rank 0 saves (and logs) a sample grid."""

    def __init__(self, config: SampleGridConfig, folder: Path):
        self.config = config
        self.folder = folder
        self.last_step = -1

    def _write(self, trainer: L.Trainer, module: DiffusionModule) -> None:
        step = trainer.global_step
        self.last_step = step
        if not trainer.is_global_zero:
            return
        pixels = save_sample_grid(module, self.config, self.folder / f"step_{step:07d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[pixels], step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.config.every_n_steps
        if every > 0 and trainer.global_step % every == 0 and trainer.global_step != self.last_step:
            self._write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.config.every_n_steps > 0 and trainer.global_step != self.last_step:
            self._write(trainer, pl_module)


class ExportEma(Callback):
    """When training ends, rank 0 exports the EMA U-Net for ``tus sample``.

    Done inside the training process, where the step count is right under every strategy
    (``ddp_spawn`` hands the launcher back the weights but not the step).
    """

    def __init__(self, config: DiffusionConfig, run_dir: Path):
        self.export = UNetExport(unet=config.unet, process=config.process)
        self.run_dir = run_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: DiffusionModule) -> None:
        stem = export_stem(self.run_dir, trainer.global_step)
        # A resume that had no step left to train ends where the last export already is.
        if trainer.is_global_zero and not stem.with_suffix(".safetensors").exists():
            save_unet_export(pl_module.ema.module, replace(self.export, step=trainer.global_step), stem)


def latest_run_config(run_dir: str | Path) -> Path:
    """The config the run last ran with: its highest ``config.resumeN.yaml``, else ``config.yaml``."""
    run_dir = Path(run_dir)
    resumes = sorted(run_dir.glob("config.resume*.yaml"), key=lambda p: int(p.stem.removeprefix("config.resume")))
    return resumes[-1] if resumes else run_dir / "config.yaml"


def _save_run_config(config: DiffusionConfig, run_dir: Path) -> None:
    """``config.yaml`` for a new run; resume N adds ``config.resumeN.yaml`` (what it ran with)."""
    path = run_dir / "config.yaml"
    attempt = 0
    while path.exists():
        attempt += 1
        path = run_dir / f"config.resume{attempt}.yaml"
    save_config(config, path)


def run_diffusion(config: DiffusionConfig, run_dir: str | Path | None = None) -> Path:
    """Train (or, given a ``run_dir`` with a checkpoint, resume) and export the EMA U-Net; returns the run dir."""
    if config.trainer.max_steps <= 0:
        raise ValueError("trainer.max_steps must be > 0: diffusion training is bounded by steps")
    if config.samples.every_n_steps > 0:
        resolve_steps(config.samples.sampler, config.samples.steps, config.process.num_timesteps)
    run_dir = resolve_run_dir(config.output_root, config.name, run_dir, RUN_DIR_ENV)
    checkpoint = last_checkpoint(run_dir)
    if rank_zero_only.rank == 0:
        _save_run_config(config, run_dir)
    L.seed_everything(config.seed, workers=True)
    module = DiffusionModule(config.unet, config.process, config.optim, config.ema, seed=config.seed, hflip=config.data.hflip)
    data = DiffusionDataModule(config.data, seed=config.seed)
    loggers = build_loggers(run_dir, config.logging, name=run_dir.name, config=to_dict(config), tags=["diffusion"])
    callbacks = [SampleGridCallback(config.samples, run_dir / "sample_grids"), ExportEma(config, run_dir)]
    trainer = build_trainer(
        config.trainer, run_dir, loggers=loggers, callbacks=callbacks, checkpoint_every_n_steps=config.data.steps_per_epoch
    )
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(checkpoint) if checkpoint else None)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tus diffusion", description="Train the improved DDPM (learned variance, hybrid loss).")
    parser.add_argument("--config", help="YAML config (e.g. experiments/diffusion/cpu.yaml)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from checkpoints/last.ckpt with the config it last ran with")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. trainer.max_steps=2000")
    args = parser.parse_args(argv)
    if args.resume and args.config:
        parser.error("--resume uses the run's own config; give overrides instead of --config")
    if args.resume:
        config = load_config(DiffusionConfig, latest_run_config(args.resume), args.overrides)
    else:
        config = load_config(DiffusionConfig, args.config, args.overrides)
    run_dir = run_diffusion(config, run_dir=args.resume)
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
