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

import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from tus.callbacks.diffusion import ExportEma, SampleGridCallback, SampleGridConfig
from tus.config import save_config, to_dict
from tus.data.pools import DiffusionDataConfig, DiffusionDataModule
from tus.methods.iddpm import (
    DiffusionModule,
    EmaConfig,
    OptimConfig,
    ProcessConfig,
    UNetConfig,
)
from tus.runs import LoggingConfig, TrainerConfig, build_loggers, build_trainer, last_checkpoint, resolve_run_dir
from tus.samplers.base import resolve_steps

# Lightning's "ddp" strategy re-runs the command in each worker process; they find the run
# directory the launching process created here instead of each making a new one.
RUN_DIR_ENV = "TUS_DIFFUSION_RUN_DIR"






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
    callbacks = [SampleGridCallback(config.samples, run_dir / "sample_grids"), ExportEma(config.unet, config.process, run_dir)]
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
