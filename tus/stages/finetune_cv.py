"""Patient-grouped K-fold x seeds fine-tuning: the reference protocol, resumable.

``run_cv`` writes one run directory::

    config.yaml         the resolved config (a resumed run must match it)
    folds.csv           sample_id, path, patient_id, label, fold
    runs/fold<F>-seed<S>/   metrics.csv, checkpoints/ (while running), model.safetensors,
                            predictions.csv, losses.csv, metrics.json (written last = done)
    runs.csv            one row per fold x seed with every test metric
    summary.json / summary.md   mean +- std per metric and the non-informative baselines

Re-running on the same directory skips runs whose ``metrics.json`` exists and resumes an
unfinished run from its ``last.ckpt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from tqdm.auto import tqdm

from tus.callbacks.gradcam import GradCAMConfig, GradCAMPlusPlusLogger
from tus.callbacks.loss_recorder import PerSampleLossRecorder
from tus.config import save_config, to_dict, write_text_atomic
from tus.data.datamodules import LabeledDataConfig, LabeledDataModule
from tus.data.folds import assign_folds, fold_table
from tus.data.manifest import load_manifest
from tus.eval.cv_summary import collect_runs, write_summary
from tus.methods.classifier import METRIC_NAMES, FineTuneModule, FineTuneOptimConfig, save_finetuned
from tus.models.backbones import BackboneConfig
from tus.runs import LoggingConfig, TrainerConfig, build_loggers, build_trainer, last_checkpoint, new_run_dir


@dataclass
class FineTuneCVConfig:
    """Everything ``tus finetune-cv`` runs: data, model, optimiser, trainer, protocol."""

    name: str = "finetune"
    output_root: str = "runs"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    # "last": test the last epoch; "inner_val": test the best epoch on an inner split of the
    # training folds. The test fold never takes part in model selection.
    selection: Literal["last", "inner_val"] = "last"
    selection_metric: str = "val/auroc"
    # A short name for the initialisation, recorded with each run (e.g. for noisy-label runs).
    init_label: str = ""
    record_losses: bool = True
    gradcam: GradCAMConfig = field(default_factory=GradCAMConfig)
    data: LabeledDataConfig = field(default_factory=LabeledDataConfig)
    model: BackboneConfig = field(default_factory=BackboneConfig)
    optim: FineTuneOptimConfig = field(default_factory=FineTuneOptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


class ResumeMismatchError(ValueError):
    """A run directory was resumed with a different config or fold table."""


# Extra callbacks per run, given (config, run_info, run_dir); the CLI adds stage callbacks here.
CallbackFactory = Callable[[FineTuneCVConfig, dict, Path], list[Callback]]


def prepare_run_dir(config: FineTuneCVConfig, run_dir: str | Path | None) -> Path:
    """A new run dir, or the given one after checking it was made by the same config."""
    if run_dir is None:
        run_dir = new_run_dir(config.output_root, config.name)
        save_config(config, run_dir / "config.yaml")
        return run_dir
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        previous = yaml.safe_load(saved.read_text())
        if previous != to_dict(config):
            changed = sorted(_diff_keys(previous, to_dict(config)))
            raise ResumeMismatchError(f"{run_dir}: config differs from the one it was started with ({', '.join(changed[:5])}); start a new run dir instead")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, saved)
    return run_dir


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = []
        for key in set(a) | set(b):
            keys += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return keys
    return [] if a == b else [prefix.rstrip(".")]


def write_or_check_folds(run_dir: Path, frame: pd.DataFrame, folds: np.ndarray) -> None:
    table = fold_table(frame, folds)
    path = run_dir / "folds.csv"
    if path.exists():
        previous = pd.read_csv(path, dtype={"sample_id": str, "patient_id": str, "path": str})
        if previous[["sample_id", "fold"]].astype(str).values.tolist() != table[["sample_id", "fold"]].astype(str).values.tolist():
            raise ResumeMismatchError(f"{path}: the fold table changed since this run dir was started (different manifest?)")
        return
    write_text_atomic(path, table.to_csv(index=False))


def run_cv(
    config: FineTuneCVConfig,
    run_dir: str | Path | None = None,
    callback_factory: CallbackFactory | None = None,
) -> Path:
    """Run every fold x seed (skipping finished ones) and write the summary; return run dir."""
    frame = load_manifest(config.data.manifest, require_labels=True, num_folds=config.data.num_folds)
    run_dir = prepare_run_dir(config, run_dir)
    folds = assign_folds(frame, config.data.num_folds, config.data.fold_seed)
    write_or_check_folds(run_dir, frame, folds)
    jobs = [(fold, seed) for seed in config.seeds for fold in range(config.data.num_folds)]
    progress = tqdm(jobs, desc=f"{config.name}: folds x seeds", unit="run")
    for fold, seed in progress:
        progress.set_postfix(fold=fold, seed=seed)
        sub = run_dir / "runs" / f"fold{fold}-seed{seed}"
        if (sub / "metrics.json").exists():
            continue
        run_single(config, frame, folds, fold, seed, sub, callback_factory)
    runs = collect_runs(run_dir)
    write_summary(run_dir, runs, frame, config)
    return run_dir


def run_single(
    config: FineTuneCVConfig,
    frame: pd.DataFrame,
    folds: np.ndarray,
    fold: int,
    seed: int,
    run_dir: Path,
    callback_factory: CallbackFactory | None = None,
) -> dict:
    """Train on all folds but ``fold``, test on it; write metrics.json last (= finished)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, workers=True)
    inner = config.selection == "inner_val"
    datamodule = LabeledDataModule(config.data, frame, folds, fold, seed, inner_validation=inner)
    module = FineTuneModule(config.model, config.optim)
    run_info = {"fold": fold, "seed": seed, "init": config.init_label or config.model.init}
    callbacks = list(callback_factory(config, run_info, run_dir)) if callback_factory else []
    selector = None
    if inner:
        selector = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="best", monitor=config.selection_metric, mode="min" if config.selection_metric.endswith("loss") else "max", save_top_k=1)
        callbacks.append(selector)
    logging = LoggingConfig(**{**to_dict(config.logging), "group": config.logging.group or config.name, "job_type": config.logging.job_type or "finetune"})
    loggers = build_loggers(run_dir, logging, name=f"{config.name}-fold{fold}-seed{seed}", config={**to_dict(config), **run_info}, tags=[f"fold{fold}", f"seed{seed}"])
    # Without inner validation there is nothing to validate on: the test fold is never peeked at.
    trainer_config = config.trainer if inner else replace(config.trainer, limit_val_batches=0)
    trainer = build_trainer(trainer_config, run_dir, loggers=loggers, callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=last_checkpoint(run_dir))
    if selector is not None:
        best = torch.load(selector.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(best["state_dict"])
    results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    metrics = {name: float(results[f"test/{name}"]) for name in METRIC_NAMES}
    if trainer.is_global_zero:
        predict(module, datamodule.test_dataloader()).to_csv(run_dir / "predictions.csv", index=False)
        save_finetuned(module, run_dir / "model")
        _drop_training_state(run_dir)
        record = {**run_info, **metrics, "epochs": trainer.current_epoch, "selection": config.selection}
        write_text_atomic(run_dir / "metrics.json", json.dumps(record, indent=2))
    return metrics


def _drop_training_state(run_dir: Path) -> None:
    """Finished runs keep model.safetensors; the optimiser-laden resume checkpoints go."""
    for checkpoint in (run_dir / "checkpoints").glob("*.ckpt"):
        checkpoint.unlink()


@torch.no_grad()
def predict(module: FineTuneModule, loader) -> pd.DataFrame:
    """Per-image positive-class probabilities and predictions on ``loader``."""
    module.eval()
    rows = []
    for batch in loader:
        probability = module(batch["image"].to(module.device)).float().softmax(1)[:, 1].cpu()
        for sample_id, label, p in zip(batch["sample_id"], batch["label"].tolist(), probability.tolist()):
            rows.append({"sample_id": sample_id, "label": label, "probability": p, "prediction": int(p >= 0.5)})
    return pd.DataFrame(rows)














def finetune_callbacks(config, run_info: dict, run_dir: Path) -> list[Callback]:
    callbacks: list[Callback] = []
    if config.record_losses:
        callbacks.append(PerSampleLossRecorder(Path(run_dir) / "losses.csv", run_info))
    if config.gradcam.enabled:
        callbacks.append(GradCAMPlusPlusLogger.from_config(config.gradcam, Path(run_dir) / "gradcam", config.data.augment.markers))
    return callbacks
