"""``tus diffusion``: train the improved DDPM on a pool of ultrasound images.

A run directory holds ``config.yaml``, ``metrics.csv`` (train/loss, train/mse, train/vlb;
a resumed run appends to it),
``checkpoints/last.ckpt`` (written every ``data.steps_per_epoch`` steps, with the EMA and the
step, so ``--resume RUN_DIR`` continues it exactly), ``sample_grids/step_XXXXXXX.png`` (grids
drawn with the EMA weights, also logged to W&B) and, when training ends,
``export/ema_unet_stepXXXXXXX/`` (a diffusers ``save_pretrained`` folder): the EMA U-Net that ``tus sample``
reads without Lightning.

Images come from the manifests/folders of ``data.sources``, resized to
``data.image_size`` and scaled to [-1, 1]; horizontal flips are drawn inside the training
step so that they, like the timesteps and the noise, replay identically after a resume.
An "epoch" here is just ``data.steps_per_epoch`` steps of batches drawn with replacement:
the checkpoint period (a checkpoint at an epoch end resumes exactly; Lightning cannot resume
plain dataloaders mid-epoch).

Class-conditional training (``unet.num_classes: K``): the manifests' ``label`` column conditions
the U-Net, each label replaced by "no label" with probability ``process.p_uncond`` (default 0.1),
and unlabelled images always "no label", so one model samples with and without labels and with
classifier-free guidance (``tus sample --label``/``--guidance``). Unconditional is the default:
labels are then ignored, as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from tus.callbacks.diffusion import ExportEma, SampleGridCallback, SampleGridConfig
from tus.config import ConfigError, require_seeds, to_dict
from tus.data.pools import DiffusionDataConfig, DiffusionDataModule
from tus.figures.runs import write_diffusion_figures
from tus.methods.iddpm import (
    DiffusionModule,
    EmaConfig,
    OptimConfig,
    ProcessConfig,
    UNetConfig,
)
from tus.runs import LoggingConfig, TrainerConfig, build_loggers, build_trainer, check_output_root, finish_loggers, open_run, resume_checkpoint, write_json_atomic
from tus.samplers import resolve_steps
from tus.tracking import track_diffusion


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

    def __post_init__(self) -> None:
        require_seeds("seed", self.seed)


def run_diffusion(config: DiffusionConfig, run_dir: str | Path | None = None, *, allow_config_change: bool = False, create: bool = False) -> Path:
    """Train (or, given a ``run_dir`` with a checkpoint, resume) and export the EMA U-Net; returns the run dir.

    A resume must run the saved config (see :func:`tus.runs.open_run`); extending a run's
    ``trainer.max_steps`` is a config change that ``allow_config_change`` records.
    """
    if config.trainer.max_steps <= 0:
        raise ConfigError("trainer.max_steps must be > 0: diffusion training is bounded by steps")
    if config.samples.every_n_steps > 0:
        resolve_steps(config.samples.sampler, config.samples.steps, config.process.num_timesteps)
    if run_dir is None:
        check_output_root(config.output_root)  # before the data are read
    data = DiffusionDataModule(config.data, seed=config.seed)
    if config.unet.num_classes is not None:
        try:
            data.check_labels(config.unet.num_classes)
        except ValueError as error:
            raise ConfigError(str(error)) from error
    data.decode_images()  # a corrupt image is refused before the run dir exists
    with open_run(config, output_root=config.output_root, name=config.name, resume=run_dir, allow_config_change=allow_config_change, create=create) as run_dir:
        if rank_zero_only.rank == 0:
            write_json_atomic(run_dir / "pool.json", data.pool_report())
        checkpoint = resume_checkpoint(run_dir)
        L.seed_everything(config.seed, workers=True)
        module = DiffusionModule(config.unet, config.process, config.optim, config.ema, seed=config.seed, hflip=config.data.hflip)
        logging = dataclasses.replace(config.logging, job_type=config.logging.job_type or "diffusion")  # job_type = the stage
        loggers = build_loggers(run_dir, logging, name=run_dir.name, config=to_dict(config), tags=["diffusion"])
        callbacks = [SampleGridCallback(config.samples, run_dir / "sample_grids"), ExportEma(config.unet, config.process, run_dir)]
        trainer = build_trainer(config.trainer, run_dir, loggers=loggers, callbacks=callbacks, checkpoint_every_n_steps=config.data.steps_per_epoch)
        trainer.fit(module, datamodule=data, ckpt_path=str(checkpoint) if checkpoint else None)
        finish_loggers(loggers)
        if trainer.is_global_zero:
            write_diffusion_figures(run_dir)
            track_diffusion(run_dir, logging, [Path(s.manifest) for s in config.data.sources if s.manifest], run_dir.name, to_dict(config))
    return run_dir
