"""Patient-grouped K-fold x seeds fine-tuning: the reference protocol, resumable.

``run_cv`` writes one run directory::

    config.yaml         the resolved config (a resumed run must match it)
    folds.csv           sample_id, path, patient_id, label, fold, content_hash
    runs/fold<F>-seed<S>/   metrics.csv, checkpoints/ (while running), model.safetensors,
                            predictions.csv, losses.csv, metrics.json (written last = done;
                            with the selected epoch/step and a ``collapsed`` flag), failed.json
                            (a run stopped by a non-finite loss: step and reason)
    runs.csv            one row per fold x seed with every test metric
    summary.json / summary.md   mean +- std per metric and the non-informative baselines

Re-running on the same directory skips runs whose ``metrics.json`` exists and resumes an
unfinished run from its ``last.ckpt`` (written at epoch ends, at most every
``trainer.checkpoint_interval_s``); the training stream of
an epoch is seeded by (seed, epoch), so a resumed run trains exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import timm
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader

from tus.callbacks.checkpoint import remove_stale_partials
from tus.callbacks.finite_loss import NonFiniteLossError
from tus.callbacks.gradcam import GradCAMPlusPlusLogger
from tus.callbacks.loss_recorder import PerSampleLossRecorder
from tus.callbacks.progress import stage_progress
from tus.callbacks.test_predictions import TestPredictions
from tus.config import ConfigError, to_dict, write_text_atomic
from tus.data.crop import read_crop_recipe
from tus.data.datamodules import LabeledDataModule
from tus.data.folds import FoldError, assign_folds, assign_folds_for_seed, fold_table, folds_from_table, read_fold_table
from tus.data.images import content_hash
from tus.data.manifest import LABEL_NAMES_ATTR, load_manifest
from tus.data.seeding import derive_seed
from tus.data.synthetic import check_generator_exclusion, read_synthetic, source_for_run
from tus.eval.cv_metrics import is_multiclass, multiclass_metrics, probability_columns
from tus.eval.cv_summary import FAILED_FILE, collapse_reason, collect_runs, write_summary
from tus.figures.runs import write_cv_figures
from tus.methods.classifier import LABEL_NAMES, METRIC_NAMES, FineTuneModule, save_finetuned
from tus.models.backbones import CheckpointError, architecture, is_vit_export, read_tus_encoder_meta
from tus.models.configs import BackboneConfig
from tus.run_config import LoggingConfig
from tus.runs import RunDirError, RunLock, build_loggers, build_trainer, check_config_change, check_output_root, open_run, resume_checkpoint
from tus.stages.configs import FineTuneCVConfig as FineTuneCVConfig
from tus.tracking import encoder_provenance, track_cv


def backbone_for_inputs(model: BackboneConfig, image_size: int) -> BackboneConfig:
    """The backbone config built for inputs of ``image_size`` px: a ViT takes one input size, so
    an unset ``model.img_size`` becomes ``data.image_size`` (a ViT export's or MAE checkpoint's
    position embeddings are resized to it when loaded) and a different one is refused, naming
    both keys. Other backbones take any size and are returned as they are."""
    if not _is_vit(model):
        return model
    if model.img_size is None:
        return replace(model, img_size=image_size)
    if model.img_size != image_size:
        raise ConfigError(
            f"model.img_size={model.img_size} but data.image_size={image_size}: a ViT is built for one input size; "
            f"set --model.img_size={image_size} or --model.img_size=null (then it is data.image_size"
            f"{'; the export is resized to it' if model.init in ('tus', 'mae') else ''})"
        )
    return model


def _is_vit(model: BackboneConfig) -> bool:
    if model.init == "tus" and model.weights:
        return is_vit_export(read_tus_encoder_meta(model.weights)[1])
    try:
        entrypoint = timm.models.model_entrypoint(architecture(model.name))
    except (KeyError, RuntimeError):  # an unknown name: timm.create_model reports it later
        return False
    # timm's VisionTransformer family (DeiT subclasses it): their patch grid is fixed at build time.
    return entrypoint.__module__ in ("timm.models.vision_transformer", "timm.models.deit")


class ResumeMismatchError(ValueError):
    """A run directory was resumed with a different fold table (another manifest)."""


# Extra callbacks per run, given (config, run_info, run_dir); the stage's own come from the config.
CallbackFactory = Callable[[FineTuneCVConfig, dict, Path], list[Callback]]


def write_or_check_folds(run_dir: Path, frame: pd.DataFrame, folds: np.ndarray | dict[int, np.ndarray]) -> None:
    """Write ``folds.csv`` (with each image file's ``content_hash``), or, resuming, check that the
    manifest still gives the same table: the same images in the same folds with the same labels
    and file contents. A change is refused naming it (sample ids, and whether fold, label or
    content changed): finished folds were trained on the old data. ``folds`` per seed (a dict,
    ``data.folds_per_seed``) writes one block of rows per seed, with a ``seed`` column."""
    hashes = [content_hash(p) for p in frame["abs_path"]]
    if isinstance(folds, dict):
        table = pd.concat([fold_table(frame, f).assign(content_hash=hashes, seed=s) for s, f in folds.items()], ignore_index=True)
    else:
        table = fold_table(frame, folds).assign(content_hash=hashes)
    table["sample_id"] = table["sample_id"].astype(str)
    if "seed" in table.columns:  # compare per (seed, sample): the key must be unique
        table["sample_id"] = table["seed"].astype(str) + "/" + table["sample_id"]
    path = run_dir / "folds.csv"
    if not path.exists():
        written = table.assign(sample_id=table["sample_id"].str.split("/", n=1).str[-1]) if "seed" in table.columns else table
        write_text_atomic(path, written.to_csv(index=False))
        return
    previous = pd.read_csv(path, dtype={"sample_id": str, "patient_id": str, "path": str, "content_hash": str})
    if ("seed" in previous.columns) != ("seed" in table.columns):
        raise ResumeMismatchError(f"{path}: this run's folds were drawn {'per seed' if 'seed' in previous.columns else 'once for every seed'}; keep data.folds_per_seed as it was")
    if "seed" in previous.columns:
        previous["sample_id"] = previous["seed"].astype(str) + "/" + previous["sample_id"]
    hint = "resume with the manifest this run was started with, or start a new run"
    removed = sorted(set(previous["sample_id"]) - set(table["sample_id"]))
    added = sorted(set(table["sample_id"]) - set(previous["sample_id"]))
    if removed or added:
        changes = [f"{what} {_some(ids)}" for what, ids in (("removed", removed), ("added", added)) if ids]
        raise ResumeMismatchError(f"{path}: the manifest's images changed since this run dir was started ({'; '.join(changes)}); {hint}")
    previous = previous.set_index("sample_id").loc[table["sample_id"]]
    changes = []
    # Run dirs from before content hashes were recorded are checked on folds and labels only.
    for column, what in (("fold", "fold"), ("label", "label"), ("content_hash", "image content")):
        if column in previous.columns:
            differs = previous[column].astype(str).to_numpy() != table[column].astype(str).to_numpy()
            if differs.any():
                changes.append(f"{what} of {_some(table.loc[differs, 'sample_id'].tolist())}")
    if changes:
        raise ResumeMismatchError(f"{path}: the manifest changed since this run dir was started ({'; '.join(changes)}); {hint}")


def _some(ids: list[str], shown: int = 5) -> str:
    """``ids`` for a message: the first few, and how many in all."""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return f"{len(ids)} image(s): {', '.join(ids[:shown])}{more}"


def run_cv(
    config: FineTuneCVConfig,
    run_dir: str | Path | None = None,
    callback_factory: CallbackFactory | None = None,
    *,
    allow_config_change: bool = False,
    create: bool = False,
) -> Path:
    """Run every fold x seed (skipping finished ones) and write the summary; return run dir.

    ``run_dir`` resumes that run (its config must match, see :func:`tus.runs.open_run`), or,
    with ``create`` and no run there yet, is where a new run goes (studies use fixed folders).
    The callbacks each run gets come from the config (:func:`finetune_callbacks`), plus those
    of ``callback_factory``.
    """
    if run_dir is None:
        check_output_root(config.output_root)  # before the data are read
    frame, folds = _manifest_and_folds(config)
    check_encoders(config, frame, folds)  # before any run dir or training: every fold's encoder fits its test fold
    check_synthetic(config, frame, folds)  # and every fold's synthetic images come from a generator that never saw it
    with open_run(config, output_root=config.output_root, name=config.name, resume=run_dir, allow_config_change=allow_config_change, create=create) as run_dir:
        write_or_check_folds(run_dir, frame, folds)
        jobs = cv_jobs(config)
        todo = [(fold, seed) for fold, seed in jobs if not (run_dir / "runs" / f"fold{fold}-seed{seed}" / "metrics.json").exists()]
        # One bar over every remaining epoch of every fold x seed: the ETA is the whole CV's.
        with stage_progress(
            len(todo) * max(config.trainer.max_epochs or 1, 1), desc=f"{config.name}: {len(todo)} of {len(jobs)} folds x seeds", enabled=config.trainer.enable_progress_bar is not False
        ):
            for fold, seed in todo:
                try:
                    run_single(config, frame, folds[seed] if isinstance(folds, dict) else folds, fold, seed, run_dir / "runs" / f"fold{fold}-seed{seed}", _with_stage_callbacks(callback_factory))
                except NonFiniteLossError as error:
                    # The summary says which run failed and why; the CV stops (the others would too).
                    write_summary(run_dir, collect_runs(run_dir), frame, config)
                    raise NonFiniteLossError(f"{run_dir.name}/runs/fold{fold}-seed{seed}: {error}") from error
        finish_models(config, frame, run_dir)
        runs = collect_runs(run_dir)
        write_summary(run_dir, runs, frame, config)
        if config.figures:
            write_cv_figures(run_dir)
        track_cv(run_dir, _cv_logging(config), name=config.name, manifest=Path(config.data.manifest), init=config.model.init, weights=config.model.weights, config=to_dict(config))
    return run_dir


# ``model.weights`` may name one encoder per fold x seed (a study's per-fold pretraining): these
# placeholders are replaced by the run's fold and seed.
WEIGHTS_PLACEHOLDERS = ("{fold}", "{seed}")


def weights_for_run(model: BackboneConfig, fold: int, seed: int) -> BackboneConfig:
    """``model`` with ``{fold}``/``{seed}`` in ``weights`` replaced by the run's."""
    if not model.weights or not any(p in model.weights for p in WEIGHTS_PLACEHOLDERS):
        return model
    return replace(model, weights=model.weights.replace("{fold}", str(fold)).replace("{seed}", str(seed)))


def check_encoder_exclusion(model: BackboneConfig, frame: pd.DataFrame, folds: np.ndarray, fold: int) -> None:
    """Refuse a tus encoder whose pretraining pool did not leave out fold ``fold``'s test patients.

    A tus encoder export records its pool's ``exclusion`` (:func:`tus.data.pools.encoder_exclusion`):
    the labelled patients whose images (and near duplicates) were left out. Fine-tuning tests on
    fold ``fold``, so each of its test patients must be among them; an encoder pretrained for
    another fold would have seen this fold's test images. Encoders that record no exclusion
    (``mode: none``, the reference's pools, or older exports) are accepted as they are.
    """
    if model.init != "tus" or not model.weights:
        return
    _, meta = read_tus_encoder_meta(model.weights)
    exclusion = meta.get("exclusion") or {"mode": "none"}
    if exclusion.get("mode", "none") == "none":
        return
    excluded = set(map(str, exclusion.get("excluded_patients", [])))
    test_patients = set(frame.loc[np.asarray(folds).astype(int) == fold, "patient_id"].astype(str))
    missing = sorted(test_patients - excluded)
    if missing:
        what = "every labelled patient" if exclusion["mode"] == "all" else f"the test patients of fold(s) {exclusion.get('test_folds')}"
        raise CheckpointError(
            f"{model.weights}: this encoder's pretraining pool left out {what} of {exclusion.get('labeled_manifest')}, not those of fold {fold}: "
            f"{len(missing)} of fold {fold}'s {len(test_patients)} test patients (e.g. {', '.join(missing[:3])}) may be in its pool; give fold {fold}'s encoder (model.weights with {{fold}})"
        )


def check_encoders(config: FineTuneCVConfig, frame: pd.DataFrame, folds: np.ndarray | dict[int, np.ndarray]) -> None:
    """:func:`check_encoder_exclusion` for every fold x seed run of the CV."""
    for fold, seed in cv_jobs(config):
        check_encoder_exclusion(weights_for_run(config.model, fold, seed), frame, folds[seed] if isinstance(folds, dict) else folds, fold)


def synthetic_source(config: FineTuneCVConfig, fold: int, seed: int) -> Path | None:
    """The synthetic source of run (``fold``, ``seed``) (``data.synthetic.source`` with ``{fold}``/``{seed}``), or None."""
    source = config.data.synthetic.source
    return source_for_run(source, fold, seed) if source else None


def check_synthetic(config: FineTuneCVConfig, frame: pd.DataFrame, folds: np.ndarray | dict[int, np.ndarray]) -> None:
    """Before any run dir: every run's synthetic source is readable and its generator left out the run's test patients
    (:func:`tus.data.synthetic.check_generator_exclusion`)."""
    synthetic = config.data.synthetic
    if not synthetic.source and (synthetic.only or synthetic.per_class is not None or synthetic.ratio is not None):
        raise ConfigError("data.synthetic: per_class, ratio and only need data.synthetic.source (a tus sample or tus filter folder)")
    if synthetic.source and config.refit:
        raise ConfigError("refit=true with data.synthetic.source: the refit trains on every labelled image, and no per-fold generator left them all out; refit without synthetic images")
    for fold, seed in cv_jobs(config):
        source = synthetic_source(config, fold, seed)
        if source is not None:
            check_generator_exclusion(source, frame, folds[seed] if isinstance(folds, dict) else folds, fold, config.data.synthetic.allow_unexcluded)
            read_synthetic(source)


def cv_jobs(config: FineTuneCVConfig) -> list[tuple[int, int]]:
    """Every (fold, seed) run of a CV, in the order :func:`run_cv` trains them (a job array's
    task index is a position in this list)."""
    return [(fold, seed) for seed in config.seeds for fold in range(config.data.num_folds)]


def _manifest_and_folds(config: FineTuneCVConfig) -> tuple[pd.DataFrame, np.ndarray | dict[int, np.ndarray]]:
    if not config.seeds:
        raise ConfigError("seeds: give at least one seed")
    if len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"seeds: {config.seeds} repeats a seed (each fold x seed run must be distinct)")
    backbone_for_inputs(weights_for_run(config.model, 0, config.seeds[0]), config.data.image_size)  # a ViT's size mismatch, before any run dir
    frame = load_manifest(config.data.manifest, require_labels=True, num_folds=config.data.num_folds, dicom_frames=config.data.dicom_frames, label_names=config.data.label_names)
    if config.data.label_names is None and frame.attrs.get(LABEL_NAMES_ATTR):
        # Labels written as names: the classes found become the config's (recorded in config.yaml,
        # so the run says which output index is which class; a resumed run infers the same).
        config.data.label_names = list(frame.attrs[LABEL_NAMES_ATTR])
    if is_multiclass(config.data.label_names):
        check_multiclass_decision(config)
    return frame, cv_folds(config, frame)


def check_multiclass_decision(config: FineTuneCVConfig) -> None:
    """Threshold rules and calibration are fitted to a positive-class probability; with K > 2 classes the
    prediction is the most probable class, so asking for either is refused (before any training)."""
    from tus.eval.thresholds import parse_threshold_rule

    rule = parse_threshold_rule(config.threshold)
    if rule.needs_data or rule.value != 0.5 or config.calibration != "none":
        raise ConfigError(
            f"threshold={config.threshold}, calibration={config.calibration}: thresholds and calibration are binary-only, but data.label_names has "
            f"{len(config.data.label_names or [])} classes (the prediction is the most probable class); keep threshold=0.5 and calibration=none"
        )


def class_names(config: FineTuneCVConfig) -> list[str]:
    """The classifier's classes, index = label: ``data.label_names``, else the binary task's."""
    return list(config.data.label_names) if config.data.label_names else list(LABEL_NAMES)


# A CV split over processes (a SLURM job array: one fold x seed per task or GPU):
# prepare_cv makes the run dir, run_cv_task trains one run into it, join_cv writes the summary
# a local run_cv writes (and refuses while a run is missing).


def prepare_cv(config: FineTuneCVConfig) -> Path:
    """A new CV run dir (``config.yaml``, ``folds.csv``), no training: fold x seed runs are then
    trained by :func:`run_cv_task` (any process, any order) and summarised by :func:`join_cv`."""
    frame, folds = _manifest_and_folds(config)
    check_encoders(config, frame, folds)
    check_synthetic(config, frame, folds)
    with open_run(config, output_root=config.output_root, name=config.name) as run_dir:
        write_or_check_folds(run_dir, frame, folds)
    return run_dir


def run_cv_task(config: FineTuneCVConfig, run_dir: str | Path, fold: int, seed: int, callback_factory: CallbackFactory | None = None) -> Path:
    """Train the one run (``fold``, ``seed``) of the CV run dir ``run_dir`` (made by
    :func:`prepare_cv` or :func:`run_cv`); returns its folder. Other runs of the same CV may be
    trained at the same time by other processes: each run's folder is locked, not the CV's.
    A finished run is left as it is; an interrupted one resumes from its ``last.ckpt``."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir}: not a CV run dir (no config.yaml); make one with tus finetune-cv --prepare")
    check_config_change(run_dir, config, allow=False)
    if (fold, seed) not in cv_jobs(config):
        raise ConfigError(f"fold={fold},seed={seed}: not a run of this CV (folds 0..{config.data.num_folds - 1}, seeds {config.seeds})")
    frame, folds = _manifest_and_folds(config)
    check_synthetic(config, frame, folds)
    write_or_check_folds(run_dir, frame, folds)
    target = run_dir / "runs" / f"fold{fold}-seed{seed}"
    if (target / "metrics.json").exists():
        return target
    with RunLock(target), stage_progress(max(config.trainer.max_epochs or 1, 1), desc=f"{config.name}: fold{fold}-seed{seed}", enabled=config.trainer.enable_progress_bar is not False):
        run_single(config, frame, folds[seed] if isinstance(folds, dict) else folds, fold, seed, target, _with_stage_callbacks(callback_factory))
    return target


def missing_runs(config: FineTuneCVConfig, run_dir: str | Path) -> list[str]:
    """The fold x seed runs of ``run_dir`` that have not finished (no ``metrics.json``)."""
    return [f"fold{fold}-seed{seed}" for fold, seed in cv_jobs(config) if not (Path(run_dir) / "runs" / f"fold{fold}-seed{seed}" / "metrics.json").exists()]


def join_cv(config: FineTuneCVConfig, run_dir: str | Path) -> Path:
    """Write ``runs.csv`` and the summary of a CV whose runs were trained separately, as
    :func:`run_cv` does; refuses (naming them) while any fold x seed run is missing: a
    summary is never a mean over fewer runs than the protocol has."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir}: not a CV run dir (no config.yaml)")
    missing = missing_runs(config, run_dir)
    if missing:
        total = len(cv_jobs(config))
        raise RunDirError(
            f"{run_dir}: {len(missing)} of {total} fold x seed runs have not finished ({', '.join(missing)}); run them (tus finetune-cv --run-dir {run_dir} --only fold=F,seed=S), then join again"
        )
    frame, _ = _manifest_and_folds(config)
    with RunLock(run_dir):
        finish_models(config, frame, run_dir)  # refit models (trained here) and thresholds, as run_cv does
        write_summary(run_dir, collect_runs(run_dir), frame, config)
        if config.figures:
            write_cv_figures(run_dir)  # the same figures (and summary.md links) as a local run
    return run_dir


def cv_folds(config: FineTuneCVConfig, frame: pd.DataFrame) -> np.ndarray | dict[int, np.ndarray]:
    """The folds of ``frame``'s rows: read from ``data.folds_from``, else drawn (once, or per
    seed with ``data.folds_per_seed``: then a dict seed -> folds). A study's per-fold pretraining
    pools leave out these folds' test patients."""
    data = config.data
    if data.folds_from:
        try:
            return folds_from_table(frame, read_fold_table(data.folds_from), data.num_folds, list(config.seeds), data.folds_per_seed, source=f"data.folds_from={data.folds_from}")
        except FoldError as error:
            raise ConfigError(str(error)) from error
    if data.folds_per_seed:
        return {seed: assign_folds_for_seed(frame, data.num_folds, data.fold_seed, seed, per_seed=True) for seed in config.seeds}
    return assign_folds(frame, data.num_folds, data.fold_seed)


def _with_stage_callbacks(extra: CallbackFactory | None) -> CallbackFactory:
    def factory(config: FineTuneCVConfig, run_info: dict, run_dir: Path) -> list[Callback]:
        return [*finetune_callbacks(config, run_info, run_dir), *(extra(config, run_info, run_dir) if extra else [])]

    return factory


class _EpochSeededStream(Callback):
    """Make an epoch's training stream a function of (seed, epoch), so a run resumed from an
    epoch-end ``last.ckpt`` draws the samples and augmentations of the uninterrupted run.

    Epoch 0 runs on the streams as seeded at the start; epoch ``e`` > 0 on the sampler's (and
    loader's: one object) generator, the augmentation and torch's global generator reseeded from
    (seed, e). Lightning makes an epoch's iterator (and prefetches its first batch) after
    ``on_train_epoch_end`` of the epoch before, but for the first epoch of a resumed fit before any
    epoch hook: so the reseed happens at the previous epoch's end, and when a checkpoint is loaded.
    Exact with ``num_workers: 0``; persistent workers keep the streams they started with.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        assert isinstance(loader, DataLoader)  # LabeledDataModule's single training loader
        self._reseed(trainer.current_epoch + 1, loader.generator, getattr(loader.dataset, "transform", None))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Fine-tuning checkpoints are written at epoch ends: the resumed fit starts the next epoch.
        datamodule = trainer.datamodule
        datamodule.setup("fit")
        self._reseed(checkpoint["epoch"] + 1, datamodule._sampler.generator, datamodule.train_set.transform)

    def _reseed(self, epoch: int, generator: torch.Generator | None, transform: object) -> None:
        seed = derive_seed(self.seed, epoch) % (2**32)
        torch.manual_seed(seed)
        if generator is not None:
            generator.manual_seed(seed)
        if hasattr(transform, "reseed"):
            transform.reseed(seed)


def run_single(
    config: FineTuneCVConfig,
    frame: pd.DataFrame,
    folds: np.ndarray,
    fold: int,
    seed: int,
    run_dir: Path,
    callback_factory: CallbackFactory | None = None,
) -> dict:
    """Train on all folds but ``fold``, test on it; write metrics.json last (= finished).

    A ``last.ckpt`` left in ``run_dir/checkpoints`` by a killed attempt is resumed from; the
    checkpoints are deleted once the run is finished (``model.safetensors`` stays).
    """
    config = replace(config, model=weights_for_run(config.model, fold, seed))
    check_encoder_exclusion(config.model, frame, folds, fold)
    source = synthetic_source(config, fold, seed)
    synthetic = None
    if source is not None:
        check_generator_exclusion(source, frame, folds, fold, config.data.synthetic.allow_unexcluded)
        synthetic = read_synthetic(source)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED_FILE).unlink(missing_ok=True)  # a retried run starts clean
    L.seed_everything(seed, workers=True)
    inner = config.selection == "inner_val"
    datamodule = LabeledDataModule(config.data, frame, folds, fold, seed, inner_validation=inner, synthetic=synthetic)
    names = class_names(config)
    module = FineTuneModule(backbone_for_inputs(config.model, config.data.image_size), config.optim, num_classes=len(names))
    run_info = {"fold": fold, "seed": seed, "init": config.init_label or config.model.init}
    test_predictions = TestPredictions()
    callbacks = [_EpochSeededStream(seed), *(callback_factory(config, run_info, run_dir) if callback_factory else []), test_predictions]
    selector = None
    if inner:
        selector = ModelCheckpoint(
            dirpath=str(run_dir / "checkpoints"), filename="best", monitor=config.selection_metric, mode="min" if config.selection_metric.endswith("loss") else "max", save_top_k=1
        )
        callbacks.append(selector)
    logging = _cv_logging(config)
    provenance = encoder_provenance(config.model.init, config.model.weights)
    loggers = build_loggers(run_dir, logging, name=f"{config.name}-fold{fold}-seed{seed}", config={**to_dict(config), **run_info, "provenance": provenance}, tags=[f"fold{fold}", f"seed{seed}"])
    # Without inner validation there is nothing to validate on: the test fold is never peeked at.
    trainer_config = config.trainer if inner else replace(config.trainer, limit_val_batches=0)
    trainer = build_trainer(trainer_config, run_dir, loggers=loggers, callbacks=callbacks)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(run_dir))
    except NonFiniteLossError as error:
        write_text_atomic(run_dir / FAILED_FILE, json.dumps({**run_info, "step": trainer.global_step, "reason": str(error)}, indent=2))
        raise
    # Which model is tested: the last one, or the one inner validation chose (its step and epoch,
    # so a selection of the first steps is visible, not hidden behind "best epoch").
    selected = {"selected_epoch": max(trainer.current_epoch - 1, 0), "selected_step": trainer.global_step}
    if selector is not None:
        best = torch.load(selector.best_model_path, map_location="cpu", weights_only=True)
        module.load_state_dict(best["state_dict"])
        selected = {"selected_epoch": int(best["epoch"]), "selected_step": int(best["global_step"])}
    results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    metrics = {name: float(results[f"test/{name}"]) for name in METRIC_NAMES} if not is_multiclass(names) else {}
    if trainer.is_global_zero:
        # One process tested the whole fold: its test pass gave the predictions. Under DDP each
        # rank tested a share (padded to equal sizes), so rank 0 predicts the fold again.
        predictions = prediction_frame(*test_predictions.arrays(len(names) if names else 2), names) if trainer.world_size == 1 else predict(module, datamodule.test_dataloader(), names)
        predictions.to_csv(run_dir / "predictions.csv", index=False)
        if is_multiclass(names):
            # Macro and per-class metrics from the written predictions (as a reader recomputes them).
            metrics = multiclass_metrics(predictions["label"].to_numpy(), predictions[probability_columns(names)].to_numpy(), names)
        write_training_manifest(datamodule, run_dir)
        save_finetuned(module, run_dir / "model", image_size=config.data.image_size, label_names=names, input_spec=input_spec(config.data))
        _drop_training_state(run_dir)
        collapsed = collapse_reason(predictions, run_dir / "metrics.csv", config.selection_metric if inner else None)
        record = {
            **run_info,
            **metrics,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "selection": config.selection,
            **selected,
            "collapsed": collapsed is not None,
            "collapse_reason": collapsed,
        }
        if source is not None:
            train_frame = datamodule.train_frame
            assert train_frame is not None
            record.update(synthetic_source=str(source), synthetic_images=int(train_frame["synthetic"].sum()), real_training_images=int((~train_frame["synthetic"].astype(bool)).sum()))
        write_text_atomic(run_dir / "metrics.json", json.dumps(record, indent=2))
    return metrics


TRAINING_MANIFEST = "train_manifest.csv"


def write_training_manifest(datamodule: LabeledDataModule, run_dir: Path) -> None:
    """``train_manifest.csv``: every image the run trained on (``synthetic`` marks generated ones; their
    ``sample_id`` starts with ``synthetic:``). Written only when the run used synthetic images."""
    frame = datamodule.train_frame
    if frame is None or "synthetic" not in frame.columns:
        return
    columns = ["sample_id", "path", "patient_id", "label", "synthetic"]
    write_text_atomic(run_dir / TRAINING_MANIFEST, frame.assign(path=frame["abs_path"], synthetic=frame["synthetic"].astype(bool))[columns].to_csv(index=False))


def _cv_logging(config: FineTuneCVConfig) -> LoggingConfig:
    """W&B group = the CV's name unless the config (a study) sets one; job type = finetune."""
    return LoggingConfig(**{**to_dict(config.logging), "group": config.logging.group or config.name, "job_type": config.logging.job_type or "finetune"})


def finish_models(config: FineTuneCVConfig, frame: pd.DataFrame, run_dir: Path) -> None:
    """After every fold: the refit models (``config.refit``), then each model's threshold and temperature."""
    from tus.stages.cv_decision import decide

    if config.refit:
        for seed in config.seeds:
            if not (run_dir / "runs" / f"refit-seed{seed}" / "refit.json").exists():
                run_refit(config, frame, seed, run_dir / "runs" / f"refit-seed{seed}")
    decide(run_dir, frame, config.threshold, config.calibration)


def run_refit(config: FineTuneCVConfig, frame: pd.DataFrame, seed: int, run_dir: Path) -> dict:
    """Train one model on every labelled image with the CV's recipe and epoch count; write refit.json last (= done).

    Nothing is held out, so nothing is evaluated: refit.json says so, and the model's expected performance is the
    CV's. No per-sample losses or Grad-CAM are recorded (they are for held-out folds). Needs ``selection: last``:
    with inner validation each fold chose its own epoch, so there is no one epoch count to repeat.
    """
    if config.data.synthetic.source:
        raise ConfigError("refit=true with data.synthetic.source: the refit trains on every labelled image, and no per-fold generator left them all out; refit without synthetic images")
    if config.selection != "last":
        raise ConfigError("refit=true needs selection=last: with inner_val each fold chose its own epoch, so there is no one recipe to refit with")
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, workers=True)
    datamodule = LabeledDataModule(config.data, frame, None, None, seed)
    names = class_names(config)
    module = FineTuneModule(config.model, config.optim, num_classes=len(names))
    logging = LoggingConfig(**{**to_dict(config.logging), "group": config.logging.group or config.name, "job_type": "refit"})
    loggers = build_loggers(run_dir, logging, name=f"{config.name}-refit-seed{seed}", config={**to_dict(config), "seed": seed, "refit": True}, tags=["refit", f"seed{seed}"])
    trainer = build_trainer(replace(config.trainer, limit_val_batches=0), run_dir, loggers=loggers, callbacks=[_EpochSeededStream(seed)])
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(run_dir))
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    record = {
        "seed": seed,
        "refit": True,
        "evaluated": False,
        "note": "trained on every labelled image; never evaluated (nothing held out): its expected performance is the CV's (summary.json)",
        "images": int(len(frame)),
        "patients": int(frame["patient_id"].nunique()),
        "epochs": trainer.current_epoch,
        "init": config.init_label or config.model.init,
    }
    if trainer.is_global_zero:
        folder = save_finetuned(module, run_dir / "model", image_size=config.data.image_size, label_names=names, input_spec=input_spec(config.data))
        exported = json.loads((folder / "config.json").read_text())
        write_text_atomic(folder / "config.json", json.dumps({**exported, "refit": record}, indent=2))  # marked in the model itself
        _drop_training_state(run_dir)
        write_text_atomic(run_dir / "refit.json", json.dumps(record, indent=2))
    return record


def input_spec(data) -> dict:
    """How an image file became a training image before resizing (``config.json``'s ``input``, which
    ``tus predict`` follows): the frame of a multi-frame DICOM, and the crop recipe when the manifest is a
    ``tus data crop`` dataset (its ``crop.json``)."""
    return {"dicom_frames": str(data.dicom_frames), "crop": read_crop_recipe(data.manifest)}


def _drop_training_state(run_dir: Path) -> None:
    """Finished runs keep model.safetensors; the optimiser-laden resume checkpoints go, and
    the temp files of writes that a killed attempt left."""
    for checkpoint in (run_dir / "checkpoints").glob("*.ckpt"):
        checkpoint.unlink()
    remove_stale_partials(run_dir / "checkpoints")


def prediction_frame(sample_ids: list[str], labels: np.ndarray, probabilities: np.ndarray, label_names: list[str] | None = None) -> pd.DataFrame:
    """Per-image predictions from the class ``probabilities`` (one row per image): binary, the
    positive-class ``probability`` and the ``prediction`` at 0.5; K > 2 classes
    (``label_names``), the most probable class as ``prediction`` and one ``prob_<class name>``
    column per class. Probabilities are written as the float64 of the model's float32 values."""
    probabilities = np.asarray(probabilities, dtype=np.float32)  # (N, K); (0, K) for no images
    frame = pd.DataFrame({"sample_id": list(sample_ids), "label": np.asarray(labels, dtype=np.int64)})
    if is_multiclass(label_names):
        assert label_names is not None
        frame["prediction"] = probabilities.argmax(1).astype(np.int64)  # the first of tied classes, as np.argmax
        for column, values in zip(probability_columns(label_names), probabilities.astype(np.float64).T):
            frame[column] = values
    else:
        frame["probability"] = probabilities[:, 1].astype(np.float64)
        frame["prediction"] = (frame["probability"] >= 0.5).astype(np.int64)
    return frame


@torch.inference_mode()
def predict(module: FineTuneModule, loader, label_names: list[str] | None = None) -> pd.DataFrame:
    """Per-image predictions of ``module`` on ``loader`` (:func:`prediction_frame`)."""
    module.eval()
    sample_ids: list[str] = []
    labels, probabilities = [], []
    for batch in loader:
        probabilities.append(module(batch["image"].to(module.device)).float().softmax(1).cpu())
        labels.append(batch["label"])
        sample_ids += list(batch["sample_id"])
    if not sample_ids:
        return prediction_frame([], np.zeros(0), np.zeros((0, len(label_names) if label_names else 2)), label_names)
    return prediction_frame(sample_ids, torch.cat(labels).numpy(), torch.cat(probabilities).numpy(), label_names)


def finetune_callbacks(config, run_info: dict, run_dir: Path) -> list[Callback]:
    callbacks: list[Callback] = []
    if config.record_losses:
        callbacks.append(PerSampleLossRecorder(Path(run_dir) / "losses.csv", run_info))
    if config.gradcam.enabled:
        callbacks.append(GradCAMPlusPlusLogger.from_config(config.gradcam, Path(run_dir) / "gradcam", config.data.augment.markers))
    return callbacks
