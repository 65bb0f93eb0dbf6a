"""``tus pretrain``: organ-supervised contrastive pretraining of an encoder, exported for fine-tuning.

One run directory per run::

    config.yaml               the resolved config
    pool.json                 images per organ, each organ's expected share of the draws,
                              the held-out monitoring slice
    metrics.csv               losses, organ accuracy, learning rates, probe accuracies
    checkpoints/last.ckpt     resume point (model, optimiser, scheduler, step)
    wandb_id.txt, wandb/      the W&B run (offline unless WANDB_MODE says otherwise)
    embeddings.csv            the held-out images' features (the UMAP by organ); downstream_embeddings.csv:
                              the downstream manifest's (the UMAP by label), when monitor.downstream_manifest is set
    encoder/                  the encoder f (model.safetensors + config.json, which records the pool's
                              ``exclusion``), for ``--model.weights=<run>/encoder``
    summary.json              steps done, last losses, the probe history

The budget is ``trainer.max_steps`` optimizer steps, not epochs, so pools of different sizes
get the same number of updates (TesticulUS, Sec. 5). ``--resume RUN_DIR`` continues a run
from its last checkpoint with the same W&B run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import nn

from tus.callbacks.probes import DownstreamProbe, OrganProbe, write_downstream_embeddings, write_heldout_embeddings
from tus.callbacks.reconstruction import ReconstructionGrid
from tus.config import ConfigError, require_seeds, to_dict
from tus.data.pools import PretrainDataConfig, PretrainDataModule, encoder_exclusion
from tus.figures.runs import DOWNSTREAM_EMBEDDINGS_FILE, EMBEDDINGS_FILE, write_pretrain_figures
from tus.methods import method_options, resolved_method_block
from tus.runs import LoggingConfig, TrainerConfig, build_loggers, build_trainer, check_output_root, finish_loggers, open_run, resume_checkpoint, write_json_atomic
from tus.tracking import track_pretraining


@dataclass
class MonitorConfig:
    """The held-out organ probe: ``holdout_per_organ`` images per organ never trained on.

    ``downstream_manifest``: a labelled manifest probed every ``downstream_every_n_steps`` steps
    with a ``downstream_classifier`` (knn or logistic) on patient-grouped folds
    (:class:`tus.callbacks.probes.DownstreamProbe`); logs ``probe/downstream_auroc`` (macro
    one-vs-rest over K > 2 classes). ``downstream_label_names``: its K class names, as
    ``data.label_names`` of fine-tuning (needed when its labels are the indices 0..K-1 of K > 2
    classes; names written in the label column are read without it).
    """

    every_n_steps: int = 100
    holdout_per_organ: int = 64
    bank_per_organ: int = 256
    knn_k: int = 20
    batch_size: int = 256
    downstream_manifest: str | None = None
    downstream_every_n_steps: int = 100
    downstream_classifier: Literal["knn", "logistic"] = "knn"
    downstream_num_folds: int = 3
    downstream_label_names: list[str] | None = None


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
    # The pretraining method: ``name`` (a registry name such as simclr_organ or mae, or an
    # importable class path) plus that method's own options (see tus.methods).
    method: dict[str, Any] = field(default_factory=lambda: {"name": "simclr_organ"})
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_epochs=-1, max_steps=1000))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        require_seeds("seed", self.seed)
        self.method = resolved_method_block(self.method)


def run_pretraining(config: PretrainConfig, run_dir: str | Path | None = None, *, allow_config_change: bool = False, create: bool = False) -> Path:
    """Pretrain with ``config.method``, export the encoder and return the run directory.

    ``run_dir`` resumes that run from its last checkpoint (same config, see
    :func:`tus.runs.open_run`), or with ``create`` is where a new run goes (a study's layout).
    Data and method are checked before any run dir is made.
    """
    if not config.data.sources:
        raise ConfigError("data.sources is empty: give at least one manifest or folder of images")
    if config.trainer.max_steps <= 0:
        raise ConfigError("trainer.max_steps must be > 0: pretraining runs a fixed number of steps")
    if run_dir is None:
        check_output_root(config.output_root)  # before the data are read
    method_cls, method = method_options(config.method)
    L.seed_everything(config.seed, workers=False)
    datamodule = PretrainDataModule(
        config.data,
        seed=config.seed,
        holdout_per_organ=config.monitor.holdout_per_organ,
        transform=method_cls.train_transform(method, config.data, config.seed),
    )
    datamodule.prepare_frames()
    if getattr(getattr(method, "loss", None), "organ_weight", 0) > 0 and not datamodule.organ_classes:
        raise ConfigError("method.loss.organ_weight > 0 but no image has an organ: add an 'organ' column, set the source's organ, or use --method.loss.organ_weight=0")
    report = datamodule.pool_report()
    datamodule.decode_images()  # a corrupt image is refused before the run dir exists
    with open_run(config, output_root=config.output_root, name=config.name, resume=run_dir, allow_config_change=allow_config_change, create=create) as run_dir:
        if rank_zero_only.rank == 0:
            write_json_atomic(run_dir / "pool.json", report)
            print(f"pretraining pool: {report['images_per_organ']} images per organ; expected draw share {report['draw_share_per_organ']}; held out {report['heldout_per_organ']}")
        module = method_cls(method, num_organs=len(datamodule.organ_classes), batch_size=config.data.batch_size)
        callbacks = []
        probe = None
        if config.monitor.every_n_steps > 0 and len(datamodule.heldout):
            bank, heldout = datamodule.probe_datasets(config.monitor.bank_per_organ)
            probe = OrganProbe(bank, heldout, every_n_steps=config.monitor.every_n_steps, k=config.monitor.knn_k, batch_size=config.monitor.batch_size)
            callbacks.append(probe)
        downstream = None
        if config.monitor.downstream_manifest:
            downstream = DownstreamProbe(
                config.monitor.downstream_manifest,
                every_n_steps=config.monitor.downstream_every_n_steps,
                image_size=config.data.image_size,
                classifier=config.monitor.downstream_classifier,
                k=config.monitor.knn_k,
                num_folds=config.monitor.downstream_num_folds,
                label_names=config.monitor.downstream_label_names,
                seed=config.seed,
                batch_size=config.monitor.batch_size,
            )
            callbacks.append(downstream)
        # Methods that can reconstruct their input (MAE) get the reconstruction grids; the stage attaches the
        # callback so that methods never import callbacks.
        every = getattr(method, "reconstruction_every_n_steps", 0)
        if every > 0 and hasattr(module, "reconstruct"):
            callbacks.append(ReconstructionGrid(every, num_images=method.reconstruction_images))
        logging = dataclasses.replace(config.logging, job_type=config.logging.job_type or "pretrain")  # job_type = the stage
        loggers = build_loggers(run_dir, logging, name=config.name, config={**to_dict(config), "pool": report}, tags=["pretrain", method_cls.__name__])
        trainer = build_trainer(config.trainer, run_dir, loggers=loggers, callbacks=callbacks, checkpoint_every_n_steps=config.checkpoint_every_n_steps, resumes_mid_epoch=True)
        if config.sync_batchnorm and trainer.world_size > 1:
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(run_dir))
        finish_loggers(loggers)
        if trainer.is_global_zero:
            export = {
                "organ_classes": list(datamodule.organ_classes),
                "steps": trainer.global_step,
                "image_size": config.data.image_size,
                "pretrain_run": run_dir.name,
                "method": config.method["name"],
                # What the pool left out (labelled patients of the test folds, or all): fine-tuning on a
                # fold whose test patients it did not leave out refuses this encoder.
                "exclusion": encoder_exclusion(report["excluded_labeled"]),
            }
            module.export_encoder(run_dir / "encoder", export)
            last = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("train/")}
            summary = {"steps": trainer.global_step, "last": last, "probe": probe.history if probe else [], "downstream_probe": downstream.history if downstream else []}
            write_json_atomic(run_dir / "summary.json", summary)
            if probe is not None:
                write_heldout_embeddings(module, probe.heldout, datamodule.heldout, run_dir / EMBEDDINGS_FILE, config.monitor.batch_size)
            if downstream is not None:  # the labelled images too: a UMAP by label
                write_downstream_embeddings(module, downstream, run_dir / DOWNSTREAM_EMBEDDINGS_FILE, config.monitor.batch_size)
            write_pretrain_figures(run_dir)
            track_pretraining(run_dir, logging, [Path(s.manifest) for s in config.data.sources if s.manifest], config.name, to_dict(config))
    return run_dir
