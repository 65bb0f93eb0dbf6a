"""The noisy-label study type: CV runs recording per-sample losses flag suspicious labels,
then a study's arms fine-tune on the filtered or flipped manifests (TesticulUS Tab. 1); run by
:func:`tus.studies.runner.run_study` for a study with a ``noisy_labels:`` block.

``protocol: reference`` filters/flips the flagged samples everywhere, test folds included, as
the paper does: a test label can be changed by a rule that saw its loss, so those rows are
optimistic. ``protocol: fold_safe`` changes the training folds only: for each test fold k it
writes ``fold_safe/fold<k>.csv`` (fold k as it was, the other folds filtered or flipped, the
flagging CVs' folds in a ``fold`` column) and trains run (k, seed) on it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tus.config import save_config
from tus.eval.noisy_labels import FlaggingRule, LossTableError, find_loss_tables, format_report, read_losses, write_report


def training_manifest(run_dirs: list[str | Path]) -> Path:
    """The ``data.manifest`` the runs were trained on (their config.yaml), which must agree."""
    manifests = set()
    for run_dir in map(Path, run_dirs):
        config = next((d / "config.yaml" for d in [run_dir, *list(run_dir.resolve().parents)[:2]] if (d / "config.yaml").is_file()), None)
        manifest = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("manifest") if config else None
        if not manifest:
            raise LossTableError(f"{run_dir}: no config.yaml naming data.manifest; give --manifest")
        manifests.add(manifest)
    if len(manifests) > 1:
        raise LossTableError(f"the runs were trained on different manifests {sorted(manifests)}; give --manifest")
    return Path(manifests.pop())


FLAGGING_DIR = "_flagging"
FLAGS_DIR = "flags"


def flag_labels(configs: dict, flagging_root: Path, flags_dir: Path, rule: FlaggingRule, histogram_min_exceed: list[int]) -> Path:
    """Run (or resume) one flagging CV per initialisation, then write the flags: ``report.json``,
    ``flagged.csv``, ``manifest_filtered.csv``, ``manifest_flipped.csv`` and the figures.

    Finished flags are the product: once ``flags/report.json`` exists they are reused as they
    are (delete the folder to flag again), so the arms of a study always see the same flags."""
    from tus.models.backbones import create_backbone
    from tus.stages.finetune_cv import run_cv

    if (flags_dir / "report.json").is_file():
        return flags_dir
    for config in configs.values():
        create_backbone(config.model)  # a missing weights file fails now, not after the first init's runs
    run_dirs = [run_cv(config, flagging_root / name, create=True) for name, config in configs.items()]
    if not (flags_dir / "report.json").is_file():
        partial = flags_dir.with_name(flags_dir.name + ".partial")
        if partial.exists():  # an interrupted earlier attempt of this same step
            shutil.rmtree(partial)
        manifest = next(iter(configs.values())).data.manifest
        write_report(read_losses(find_loss_tables(run_dirs)), manifest, rule, partial, histogram_min_exceed)
        partial.rename(flags_dir)
    print(format_report(json.loads((flags_dir / "report.json").read_text())))
    return flags_dir


def fold_safe_manifests(manifest: pd.DataFrame, folds: np.ndarray, flagged: set[str], variant: str, out_dir: Path) -> dict[int, Path]:
    """Write one manifest per test fold k: fold k unchanged, the training folds filtered or flipped.

    Every manifest carries the folds in a ``fold`` column, so the split is the flagging CVs' one
    whatever rows were dropped. Returns {fold: path}; existing files (a resumed study) are kept.
    """
    if variant not in ("filtered", "flipped"):
        raise ValueError(f"fold-safe manifests are for the filtered and flipped variants, not {variant!r}")
    from tus.data.manifest import write_manifest

    table = manifest.assign(fold=np.asarray(folds, dtype=int))
    is_flagged = table["sample_id"].astype(str).isin(flagged)
    paths = {}
    for fold in sorted(np.unique(folds).tolist()):
        changed = is_flagged & (table["fold"] != fold)
        if variant == "filtered":
            rows = table[~changed]
        else:
            rows = table.copy()
            rows.loc[changed, "label"] = 1 - rows.loc[changed, "label"]
        path = out_dir / f"fold{fold}.csv"
        if not path.is_file():
            write_manifest(rows, path)
        paths[int(fold)] = path
    return paths


def run_fold_safe_cv(config, manifest_path: str | Path, flagged: set[str], variant: str, cv_dir: Path) -> Path:
    """The folds x seeds of ``config`` where run (k, seed) trains on ``fold_safe/fold<k>.csv``.

    The folds are those of the complete manifest under ``config.data`` (the flagging CVs' folds);
    finished runs (``metrics.json``) are skipped, so the study resumes.
    """
    from tus.data.folds import assign_folds
    from tus.data.manifest import load_manifest
    from tus.eval.cv_summary import collect_runs, write_summary
    from tus.stages.finetune_cv import finetune_callbacks, run_single

    complete = load_manifest(manifest_path, require_labels=True, num_folds=config.data.num_folds, dicom_frames=config.data.dicom_frames)
    folds = assign_folds(complete, config.data.num_folds, config.data.fold_seed)
    paths = fold_safe_manifests(complete, folds, flagged, variant, cv_dir / "fold_safe")
    if not (cv_dir / "config.yaml").is_file():
        save_config(config, cv_dir / "config.yaml")
    for seed in config.seeds:
        for fold, path in paths.items():
            run_dir = cv_dir / "runs" / f"fold{fold}-seed{seed}"
            if (run_dir / "metrics.json").exists():
                continue
            frame = load_manifest(path, require_labels=True)
            run_single(config, frame, frame["fold"].astype(int).to_numpy(), fold, seed, run_dir, finetune_callbacks)
    write_summary(cv_dir, collect_runs(cv_dir), complete, config)
    return cv_dir
