"""Callbacks of diffusion training: EMA sample grids during training and the EMA U-Net export at
the end (done inside the training process, where the step count is right under every strategy)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from torchvision.utils import make_grid

from tus.data.images import write_grayscale
from tus.data.seeding import derive_seed
from tus.methods.iddpm import DiffusionModule, ProcessConfig, UNetConfig, UNetExport, export_stem, save_unet_export
from tus.samplers import sample_images
from tus.samplers.base import to_uint8


@dataclass
class SampleGridConfig:
    """Grids of EMA samples written (and logged) during training; every_n_steps 0 turns them off."""

    every_n_steps: int = 10000
    num_images: int = 16
    sampler: str = "respaced"  # a name in tus.samplers.SAMPLERS (or a class path)
    steps: int = 50
    seed: int = 0


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
    """When training ends, rank 0 exports the EMA U-Net for ``tus sample`` (the folder ``export/ema_unet_stepN/``).

    Done inside the training process, where the step count is right under every strategy
    (``ddp_spawn`` hands the launcher back the weights but not the step).
    """

    def __init__(self, unet: UNetConfig, process: ProcessConfig, run_dir: Path):
        self.export = UNetExport(unet=unet, process=process)
        self.run_dir = run_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: DiffusionModule) -> None:
        folder = export_stem(self.run_dir, trainer.global_step)
        # A resume that had no step left to train ends where the last export already is.
        if trainer.is_global_zero and not folder.exists():
            save_unet_export(pl_module.ema.module, replace(self.export, step=trainer.global_step), folder)
