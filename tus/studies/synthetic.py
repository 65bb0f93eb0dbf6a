"""The synthetic-image study type: fine-tuning with generated images, fold-safe; run by
:func:`tus.studies.runner.run_study` for a study with a ``synthetic:`` block (:class:`SyntheticStudy`).

A generator trained on every labelled image would hand the test fold's patients to training
through its samples. So for each test fold k (and seed, when the folds are drawn per seed) this
trains one class-conditional diffusion model on fold k's training patients only (its pool is the
labelled set with ``exclude_labeled=test_folds`` and ``test_folds=[k]``, so ``pool.json`` and the
samples' ``generator.json`` record that fold k's patients were left out), draws ``per_class`` images
of each class, keeps those inside their class's manifold of fold k's real *training* images
(``tus filter --per-class``), and leaves them in ``<study>/_synthetic/[seed<s>-]fold<k>/synthetic``,
which the arms with ``synthetic: added|only`` read as ``data.synthetic.source``. Fine-tuning
checks each fold's samples against its test patients (:func:`tus.data.synthetic.check_generator_exclusion`).

Layout per fold (x seed)::

    _synthetic/<run>/folds.csv      the labelled set with its folds (absolute paths): the generator's pool
    _synthetic/<run>/train.csv      the fold's training rows: the filter's real reference
    _synthetic/<run>/classes.csv    one training row per class: the labels the samples cycle through
    _synthetic/<run>/diffusion/     the diffusion run (pool.json, export/)
    _synthetic/<run>/samples/       tus sample's folder (generator.json); with filter_k: null it is synthetic/
    _synthetic/<run>/synthetic/     the kept samples (manifest.csv with label, filter.json, generator.json)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import torch

from tus.config import load_config, write_text_atomic
from tus.data.folds import fold_table
from tus.data.manifest import load_manifest
from tus.data.synthetic import MANIFEST_FILE, source_for_run
from tus.methods.iddpm import latest_export
from tus.stages.diffusion import DiffusionConfig, run_diffusion
from tus.stages.finetune_cv import FineTuneCVConfig, cv_folds, cv_jobs
from tus.stages.sample import generate
from tus.stages.synthetic import run_filter
from tus.studies.schema import Study, StudyError, SyntheticStudy

SYNTHETIC_DIR = "_synthetic"
SOURCE_FOLDER = "synthetic"


def synthetic_template(study_dir: Path, per_seed: bool) -> str:
    """``data.synthetic.source`` of the study's synthetic arms (``{fold}``/``{seed}`` filled per run)."""
    run = "seed{seed}-fold{fold}" if per_seed else "fold{fold}"
    return str(study_dir / SYNTHETIC_DIR / run / SOURCE_FOLDER)


def ensure_synthetic(study: Study, block: SyntheticStudy, config: FineTuneCVConfig, study_dir: Path, overrides: list[str]) -> list[Path]:
    """Train, sample and filter one generator per test fold (x seed) of ``config``'s CV, skipping finished ones;
    returns the synthetic folders. ``config`` is a synthetic arm's fine-tuning config (its ``data.folds_from``
    is the study's fold table); ``overrides``: the diffusion config's (the block's, then shrink and command line:
    :func:`tus.studies.runner.synthetic_overrides`)."""
    frame = load_manifest(config.data.manifest, require_labels=True, num_folds=config.data.num_folds, dicom_frames=config.data.dicom_frames)
    folds = cv_folds(config, frame)
    classes = sorted(frame["label"].astype(int).unique().tolist())
    template = synthetic_template(study_dir, isinstance(folds, dict))
    done: list[Path] = []
    for fold, seed in cv_jobs(config):
        target = source_for_run(template, fold, seed)
        if target not in done:
            _one_generator(study, block, frame, folds[seed] if isinstance(folds, dict) else folds, fold, seed, classes, target, overrides)
            done.append(target)
    return done


def _one_generator(study: Study, block: SyntheticStudy, frame: pd.DataFrame, folds, fold: int, seed: int, classes: list[int], target: Path, overrides: list[str]) -> None:
    if (target / MANIFEST_FILE).is_file():
        check_kept(study, target, fold)
        return  # finished (the filter's folder appears whole, by rename)
    root = target.parent
    root.mkdir(parents=True, exist_ok=True)
    table = fold_table(frame, folds).assign(path=frame["abs_path"].to_numpy())
    write_text_atomic(root / "folds.csv", table.to_csv(index=False))
    training = table[table["fold"] != fold]
    write_text_atomic(root / "train.csv", training.to_csv(index=False))
    write_text_atomic(root / "classes.csv", training.drop_duplicates("label").sort_values("label").to_csv(index=False))
    path = study.config_path(block.diffusion_config)
    pool = [
        f"data.sources=[{{manifest: {root / 'folds.csv'}}}]",
        "data.exclude_labeled=test_folds",
        f"data.labeled_manifest={root / 'folds.csv'}",
        f"data.test_folds=[{fold}]",
        f"seed={seed}",
        f"name={study.name}-{root.name}-diffusion",
        f"output_root={root}",
    ]
    try:
        diffusion = load_config(DiffusionConfig, path, [*overrides, *pool])
    except ValueError as error:
        raise StudyError(f"{study.path}: synthetic.diffusion ({path.name}): {error}") from error
    # W&B: the generators of a study group together, apart from its arms' fine-tuning.
    logging = diffusion.logging
    diffusion = dataclasses.replace(diffusion, logging=dataclasses.replace(logging, group=logging.group or f"{root.parent.parent.name}/{SYNTHETIC_DIR}", job_type=logging.job_type or "diffusion"))
    if diffusion.unet.num_classes is None:  # a class-conditional generator over the labelled set's classes
        diffusion = dataclasses.replace(diffusion, unet=dataclasses.replace(diffusion.unet, num_classes=max(classes) + 1))
    run_dir = root / "diffusion"
    if not run_dir.is_dir() or latest_export(run_dir) is None:
        run_dir.mkdir(exist_ok=True)
        run_diffusion(diffusion, run_dir, create=True)
    samples = root / ("samples" if block.filter_k is not None else SOURCE_FOLDER)
    device = block.device if block.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    generate(
        run_dir,
        samples,
        block.per_class * len(classes),
        sampler=block.sampler,
        steps=block.steps,
        seed=seed,
        batch_size=block.batch_size,
        device=device,
        progress=False,
        labels_from=root / "classes.csv",
        guidance=block.guidance,
    )
    if block.filter_k is not None:
        # The real reference is the fold's training images: the test fold takes no part.
        run_filter(root / "train.csv", samples, target, k=block.filter_k, per_class=True, extractor=block.extractor, device=device, cache_dir=root.parent / "features", batch_size=block.batch_size)
        check_kept(study, target, fold)


def check_kept(study: Study, target: Path, fold: int) -> None:
    """Refuse a filtered folder that kept no sample of some class: nothing to fine-tune on (the generator's
    samples of that class all lie off the real manifold), not a result."""
    report = target / "filter.json"
    if not report.is_file():
        return
    per_class = json.loads(report.read_text(encoding="utf-8")).get("per_class") or {}
    empty = [label for label, counts in per_class.items() if counts["kept"] == 0]
    if empty:
        raise StudyError(
            f"{study.path}: fold {fold}'s filter kept none of the samples of class(es) {', '.join(empty)} ({report}); "
            f"train the generator longer or raise synthetic.filter_k (null: no filter), then remove {target.parent} and run again"
        )
