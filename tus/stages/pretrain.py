"""``tus pretrain``: organ-supervised contrastive pretraining of an encoder, exported for fine-tuning.

One run directory per run::

    config.yaml               the resolved config
    pool.json                 images per organ, each organ's expected share of the draws,
                              the held-out monitoring slice
    metrics.csv               losses, organ accuracy, learning rates, probe accuracies
    checkpoints/last.ckpt     resume point (model, optimiser, scheduler, step)
    wandb_id.txt, wandb/      the W&B run (offline unless WANDB_MODE says otherwise)
    encoder.safetensors/.json the encoder f, for ``tus finetune-cv model.init=tus model.weights=...``
    summary.json              steps done, last losses, the probe history

The budget is ``trainer.max_steps`` optimizer steps, not epochs, so pools of different sizes
get the same number of updates (TesticulUS, Sec. 5). ``--resume RUN_DIR`` continues a run
from its last checkpoint with the same W&B run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from tus.callbacks.probes import OrganProbe
from tus.config import save_config, to_dict
from tus.data.pools import PretrainDataConfig, PretrainDataModule
from tus.methods.simclr_organ import PretrainLossConfig, PretrainModelConfig, PretrainModule
from tus.models.backbones import save_encoder
from tus.optim import LarsConfig, ScheduleConfig
from tus.runs import LoggingConfig, TrainerConfig, build_loggers, build_trainer, last_checkpoint, resolve_run_dir

# Lightning's "ddp" strategy relaunches this command for ranks 1..N-1; they read the run
# directory rank 0 created from here instead of creating their own.
RUN_DIR_ENV = "TUS_PRETRAIN_RUN_DIR"




@dataclass
class MonitorConfig:
    """The held-out organ probe: ``holdout_per_organ`` images per organ never trained on."""

    every_n_steps: int = 100
    holdout_per_organ: int = 64
    bank_per_organ: int = 256
    knn_k: int = 20
    batch_size: int = 256


@dataclass
class PretrainConfig:
    name: str = "pretrain"
    output_root: str = "runs"
    seed: int = 0
    checkpoint_every_n_steps: int | None = 200
    # Batch-norm statistics over the global batch under multi-GPU DDP, as SimCLR does (the
    # conversion needs GPUs; it is skipped in a single process).
    sync_batchnorm: bool = False
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    loss: PretrainLossConfig = field(default_factory=PretrainLossConfig)
    optimizer: LarsConfig = field(default_factory=LarsConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_epochs=-1, max_steps=1000))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)










def run_pretraining(config: PretrainConfig, run_dir: str | Path | None = None) -> Path:
    """Pretrain, export ``encoder.safetensors`` and return the run directory."""
    if not config.data.sources:
        raise ValueError("data.sources is empty: give at least one manifest or folder of images")
    if config.trainer.max_steps <= 0:
        raise ValueError("trainer.max_steps must be > 0: pretraining runs a fixed number of steps")
    L.seed_everything(config.seed, workers=False)
    run_dir = resolve_run_dir(config.output_root, config.name, run_dir, RUN_DIR_ENV)
    is_rank_zero = rank_zero_only.rank == 0

    datamodule = PretrainDataModule(config.data, seed=config.seed, holdout_per_organ=config.monitor.holdout_per_organ)
    datamodule.prepare_frames()
    if config.loss.organ_weight > 0 and not datamodule.organ_classes:
        raise ValueError("loss.organ_weight > 0 but no image has an organ: add an 'organ' column, set the source's organ, or use loss.organ_weight=0")
    report = datamodule.pool_report()
    if is_rank_zero:
        save_config(config, run_dir / "config.yaml")
        (run_dir / "pool.json").write_text(json.dumps(report, indent=2))
        print(f"pretraining pool: {report['images_per_organ']} images per organ; expected draw share {report['draw_share_per_organ']}; held out {report['heldout_per_organ']}")

    module = PretrainModule(
        config.model,
        config.loss,
        config.optimizer,
        config.schedule,
        num_organs=len(datamodule.organ_classes),
        batch_size=config.data.batch_size,
    )
    callbacks = []
    probe = None
    if config.monitor.every_n_steps > 0 and len(datamodule.heldout):
        bank, heldout = datamodule.probe_datasets(config.monitor.bank_per_organ)
        probe = OrganProbe(bank, heldout, every_n_steps=config.monitor.every_n_steps, k=config.monitor.knn_k, batch_size=config.monitor.batch_size)
        callbacks.append(probe)
    loggers = build_loggers(run_dir, config.logging, name=config.name, config={**to_dict(config), "pool": report}, tags=["pretrain"])
    trainer = build_trainer(config.trainer, run_dir, loggers=loggers, callbacks=callbacks, checkpoint_every_n_steps=config.checkpoint_every_n_steps)
    if config.sync_batchnorm and trainer.world_size > 1:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=last_checkpoint(run_dir))
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    if trainer.is_global_zero:
        export = {"organ_classes": list(datamodule.organ_classes), "steps": trainer.global_step, "image_size": config.data.image_size, "pretrain_run": run_dir.name}
        save_encoder(module.encoder, config.model.backbone, run_dir / "encoder", extra=export)
        last = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("train/")}
        summary = {"steps": trainer.global_step, "last": last, "probe": probe.history if probe else []}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir


