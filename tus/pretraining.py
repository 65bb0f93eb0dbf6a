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

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from tus.config import load_config, save_config, to_dict
from tus.data.datamodules import ImagePoolDataModule, ImageSourceConfig
from tus.data.datasets import ManifestDataset
from tus.data.transforms import eval_transform
from tus.data.views import ViewConfig, ViewPairTransform
from tus.models.backbones import save_encoder
from tus.modules.pretrain import OrganProbe, PretrainLossConfig, PretrainModelConfig, PretrainModule
from tus.optim import LarsConfig, ScheduleConfig
from tus.training import LoggingConfig, TrainerConfig, build_loggers, build_trainer, last_checkpoint, resolve_run_dir

# Lightning's "ddp" strategy relaunches this command for ranks 1..N-1; they read the run
# directory rank 0 created from here instead of creating their own.
RUN_DIR_ENV = "TUS_PRETRAIN_RUN_DIR"


@dataclass
class PretrainDataConfig:
    """The unlabelled pool: weighted sources, input size, per-device batch, views."""

    sources: list[ImageSourceConfig] = field(default_factory=list)
    image_size: int = 224
    batch_size: int = 512
    num_workers: int = 4
    # Fixes the organ vocabulary (head index = position); None: the sorted organs found.
    organ_classes: list[str] | None = None
    require_organ: bool = False
    cache_images: bool = True
    samples_per_epoch: int | None = None
    views: ViewConfig = field(default_factory=ViewConfig)


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


PROBE_COLUMNS = ["path", "abs_path", "sample_id", "patient_id", "label", "organ"]


def split_heldout(frames: list[pd.DataFrame], per_organ: int, seed: int) -> tuple[list[pd.DataFrame], pd.DataFrame]:
    """Move about ``per_organ`` images of each organ out of the pool, whole patients at a time.

    Images of one patient (or, without patient ids, one image) stay on one side, so near
    duplicates cannot leak into the probe. At most half of an organ's images are held out.
    Images without an organ always stay in the pool. Returns (pool frames, held-out frame).
    """
    rng = np.random.default_rng(seed)
    tagged = pd.concat(
        [f.assign(source=i, row=np.arange(len(f))) for i, f in enumerate(frames)], ignore_index=True
    )
    groups = tagged["source"].astype(str) + "/" + tagged["patient_id"].astype(str)
    held = np.zeros(len(tagged), dtype=bool)
    for organ in sorted(set(tagged["organ"]) - {""}):
        of_organ = (tagged["organ"] == organ).to_numpy()
        budget = min(per_organ, int(of_organ.sum()) // 2)
        for group in rng.permutation(groups[of_organ].unique()):
            if held[of_organ].sum() >= budget:
                break
            held |= (groups == group).to_numpy() & of_organ
    pool = []
    for i, frame in enumerate(frames):
        held_rows = tagged.loc[held & (tagged["source"] == i).to_numpy(), "row"].to_numpy()
        pool.append(frame.drop(index=frame.index[held_rows]).reset_index(drop=True))
    return pool, tagged.loc[held, PROBE_COLUMNS].reset_index(drop=True)


def sample_per_organ(frames: list[pd.DataFrame], per_organ: int, seed: int) -> pd.DataFrame:
    """Up to ``per_organ`` random images of each organ from the pool (the k-NN bank)."""
    rows = pd.concat([f[PROBE_COLUMNS] for f in frames], ignore_index=True)
    rows = rows[rows["organ"] != ""]
    picked = [group.sample(n=min(per_organ, len(group)), random_state=seed) for _, group in rows.groupby("organ")]
    return pd.concat(picked, ignore_index=True) if picked else rows.iloc[:0]


class PretrainDataModule(ImagePoolDataModule):
    """The weighted image pool through a :class:`ViewPairTransform`, minus a held-out slice.

    The held-out slice (``holdout_per_organ`` images per organ) and a bank of pool images
    feed the :class:`OrganProbe`. Each DDP rank gets its own stream of view draws.
    """

    def __init__(self, config: PretrainDataConfig, *, seed: int, holdout_per_organ: int = 0):
        super().__init__(
            config.sources,
            ViewPairTransform(config.views, config.image_size, seed=seed),
            image_size=config.image_size,
            batch_size=config.batch_size,
            num_workers=config.num_workers,
            organ_classes=config.organ_classes,
            require_organ=config.require_organ,
            cache_images=config.cache_images,
            seed=seed,
            samples_per_epoch=config.samples_per_epoch,
        )
        self.holdout_per_organ = holdout_per_organ
        self.heldout: pd.DataFrame | None = None

    def prepare_frames(self) -> list[pd.DataFrame]:
        if self.heldout is None:
            frames = super().prepare_frames()
            self.frames, self.heldout = split_heldout(frames, self.holdout_per_organ, self.seed)
            for source, frame in zip(self.sources, self.frames):
                if frame.empty:
                    raise ValueError(f"{source.manifest or source.folder}: no images left for training after holding out the probe slice; lower monitor.holdout_per_organ")
        return self.frames

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.transform.set_rank(self.trainer.global_rank if self.trainer is not None else 0)

    def train_dataloader(self):
        # Lightning asks for the loader after restoring a checkpoint: folding the step into the
        # seeds makes a resumed run draw new images (and, without workers, new views) instead
        # of replaying the start of the run. Workers reseed their views from torch's seed.
        step = self.trainer.global_step if self.trainer is not None else 0
        self.transform.reseed(self.seed + step)
        self.reseed_sampler(self.seed + step)
        return super().train_dataloader()

    def probe_datasets(self, bank_per_organ: int) -> tuple[ManifestDataset, ManifestDataset]:
        """(bank from the pool, held-out slice), single views under the eval transform."""
        frames = self.prepare_frames()
        bank = sample_per_organ(frames, bank_per_organ, self.seed)
        return tuple(
            ManifestDataset(frame, eval_transform(), image_size=self.image_size, organ_index=self.organ_index, cache=self.cache_images)
            for frame in (bank, self.heldout)
        )

    def pool_report(self) -> dict:
        """Images per organ in the training pool, each organ's expected share of the draws."""
        frames = self.prepare_frames()
        total_weight = sum(s.weight for s in self.sources)
        share: dict[str, float] = {}
        for source, frame in zip(self.sources, frames):
            fractions = frame["organ"].replace("", "(none)").value_counts(normalize=True)
            for organ, fraction in fractions.items():
                share[organ] = share.get(organ, 0.0) + source.weight / total_weight * float(fraction)
        return {
            "organ_classes": list(self.organ_classes),
            "images_per_organ": self.organ_counts(),
            "draw_share_per_organ": {k: round(v, 4) for k, v in sorted(share.items())},
            "images_per_source": {str(s.manifest or s.folder): len(f) for s, f in zip(self.sources, frames)},
            "heldout_per_organ": {k: int(v) for k, v in self.heldout["organ"].value_counts().sort_index().items()},
        }


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tus pretrain",
        description="Organ-supervised contrastive pretraining (SimCLR + organ CE, LARS); writes a new run dir with encoder.safetensors.",
    )
    parser.add_argument("--config", help="YAML config, e.g. experiments/pretrain/cpu.yaml (not needed with --resume)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint, with its config.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.max_steps=200")
    args = parser.parse_args(argv)
    if args.resume:
        if args.config:
            parser.error("--resume uses RUN_DIR/config.yaml; give overrides instead of --config")
        config = load_config(PretrainConfig, Path(args.resume) / "config.yaml", args.overrides)
    elif args.config:
        config = load_config(PretrainConfig, args.config, args.overrides)
    else:
        parser.error("give --config CONFIG.yaml, or --resume RUN_DIR")
    run_dir = run_pretraining(config, args.resume)
    if rank_zero_only.rank == 0:
        print(f"encoder: {run_dir / 'encoder.safetensors'}")
        print(f"run dir: {run_dir}")
    return 0
