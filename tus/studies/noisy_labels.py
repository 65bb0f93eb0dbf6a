"""The noisy-label study type: CV runs recording per-sample losses flag suspicious labels,
then a study's arms fine-tune on the filtered or flipped manifests (TesticulUS Tab. 1); run by
:func:`tus.studies.runner.run_study` for a study with a ``noisy_labels:`` block.

``protocol: reference`` filters/flips the flagged samples everywhere, test folds included, as
the paper does: a test label can be changed by a rule that saw its loss, so those rows are
optimistic. ``protocol: fold_safe`` changes the training folds only, and with flags that never
saw the test fold: for the run tested on fold k (of seed s's split) a training row is flagged
from the flagging runs whose test fold was that same fold k only, so no flag comes from a model
that trained on the test fold (``flags/fold_safe_flags.csv``). It writes ``fold_safe/fold<k>-seed<s>.csv`` (fold k as it was,
the other folds filtered or flipped, the folds in a ``fold`` column) and trains run (k, s) on it.

Every CV of a noisy-label study (flagging, complete, filtered, flipped, fold-safe) reads its
folds from one table (``data.folds_from``, written by the study runner from the complete
manifest), so a filtered arm keeps each remaining row's fold and the arms are paired.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tus.config import save_config
from tus.eval.noisy_labels import FlaggingRule, LossTableError, find_loss_tables, flag_samples, format_report, read_losses, write_report
from tus.tracking import track_noisy_labels


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


FOLD_SAFE_FLAGS = "fold_safe_flags.csv"


def flag_labels(configs: dict, flagging_root: Path, flags_dir: Path, rule: FlaggingRule, histogram_min_exceed: list[int]) -> Path:
    """Run (or resume) one flagging CV per initialisation, then write the flags: ``report.json``,
    ``flagged.csv``, ``manifest_filtered.csv``, ``manifest_flipped.csv``, the figures, and
    ``fold_safe_flags.csv`` (the flags of each test fold from its own flagging runs).

    Finished flags are the product: once ``flags/report.json`` exists they are reused as they
    are (delete the folder to flag again), so the arms of a study always see the same flags."""
    from tus.models.backbones import create_backbone
    from tus.stages.finetune_cv import run_cv

    if (flags_dir / "report.json").is_file() and (flags_dir / FOLD_SAFE_FLAGS).is_file():
        return flags_dir
    if not (flags_dir / "report.json").is_file():
        for config in configs.values():
            create_backbone(config.model)  # a missing weights file fails now, not after the first init's runs
    # Also when only the per-fold flags are missing: run_cv refuses flagging runs made with
    # other settings (e.g. other folds), whose losses would give the wrong runs' flags.
    run_dirs = [run_cv(config, flagging_root / name, create=True) for name, config in configs.items()]
    losses = read_losses(find_loss_tables(run_dirs))
    seeds = sorted({seed for config in configs.values() for seed in config.seeds})
    per_seed = {config.data.folds_per_seed for config in configs.values()}
    if len(per_seed) > 1:
        raise LossTableError("the flagging CVs disagree on data.folds_per_seed; give every init the same folds")
    if not (flags_dir / "report.json").is_file():
        partial = flags_dir.with_name(flags_dir.name + ".partial")
        if partial.exists():  # an interrupted earlier attempt of this same step
            shutil.rmtree(partial)
        manifest = next(iter(configs.values())).data.manifest
        write_report(losses, manifest, rule, partial, histogram_min_exceed)
        write_fold_safe_flags(losses, rule, seeds, per_seed.pop(), partial / FOLD_SAFE_FLAGS)
        partial.rename(flags_dir)
        track_noisy_labels(flags_dir, Path(manifest), next(iter(configs.values())).logging)
    else:  # flags from before per-fold flags were written: add them from the same runs
        write_fold_safe_flags(losses, rule, seeds, per_seed.pop(), flags_dir / FOLD_SAFE_FLAGS)
    print(format_report(json.loads((flags_dir / "report.json").read_text())))
    print(format_fold_safe_flags(read_fold_safe_flags(flags_dir)))
    return flags_dir


def fold_safe_flags(losses: pd.DataFrame, rule: FlaggingRule, seeds: list[int], per_seed: bool) -> pd.DataFrame:
    """Per run (test fold k, seed s) of a fold-safe arm: the samples flagged by the flagging runs
    whose test fold was k, the only runs that never trained on it. With one split for every seed
    those are runs (k, any seed, any init); with folds re-drawn per seed, runs (k, s, any init),
    since another seed's split mixes fold k's patients into its training folds.

    Columns: ``fold``, ``seed``, ``sample_id``, ``flagged_in``, ``evaluations`` (one row per
    flagged sample; a run with nothing flagged has no rows)."""
    missing = [c for c in ("fold", "seed") if c not in losses.columns]
    if missing:
        raise LossTableError(f"the loss tables lack column(s) {missing}: per-fold flags need each run's test fold and seed")
    rows = []
    folds = sorted(losses["fold"].astype(int).unique().tolist())
    for seed in seeds:
        for fold in folds:
            chosen = (losses["fold"].astype(int) == fold) & ((losses["seed"].astype(int) == seed) if per_seed else True)
            if not chosen.any():
                raise LossTableError(f"no flagging run was tested on fold {fold}{f' of seed {seed}' if per_seed else ''}: the flagging CVs must use the arms' folds and seeds")
            flags = flag_samples(losses[chosen], rule)
            flagged = flags[flags["flagged"]]
            rows += [{"fold": fold, "seed": seed, "sample_id": sample, "flagged_in": int(r.flagged_in), "evaluations": int(r.evaluations)} for sample, r in flagged.iterrows()]
    return pd.DataFrame(rows, columns=["fold", "seed", "sample_id", "flagged_in", "evaluations"])


def write_fold_safe_flags(losses: pd.DataFrame, rule: FlaggingRule, seeds: list[int], per_seed: bool, path: Path) -> None:
    from tus.config import write_text_atomic

    table = fold_safe_flags(losses, rule, seeds, per_seed)
    note = "one split for every seed: runs (k, every seed, every init)" if not per_seed else "folds re-drawn per seed: runs (k, s, every init)"
    write_text_atomic(path, f"# flags for the fold-safe run (fold k, seed s) from the flagging runs tested on fold k ({note})\n" + table.to_csv(index=False))


def read_fold_safe_flags(flags_dir: Path) -> pd.DataFrame:
    return pd.read_csv(flags_dir / FOLD_SAFE_FLAGS, comment="#", dtype={"sample_id": str})


def format_fold_safe_flags(table: pd.DataFrame) -> str:
    """One line: how many samples each fold-safe run has flagged, from how many evaluations."""
    if table.empty:
        return "fold-safe flags (from the flagging runs tested on each run's test fold only): none flagged"
    counts = table.groupby(["fold", "seed"]).size()
    evaluations = int(table["evaluations"].max())
    return f"fold-safe flags (from the flagging runs tested on each run's test fold only, up to {evaluations} evaluations per sample): " + ", ".join(
        f"fold {f} seed {s}: {n}" for (f, s), n in counts.items()
    )


def fold_safe_manifest(manifest: pd.DataFrame, folds: np.ndarray, test_fold: int, flagged: set[str], variant: str) -> pd.DataFrame:
    """The manifest of the fold-safe run tested on ``test_fold``: that fold unchanged, the flagged
    rows of the training folds dropped or flipped; the folds in a ``fold`` column."""
    if variant not in ("filtered", "flipped"):
        raise ValueError(f"fold-safe manifests are for the filtered and flipped variants, not {variant!r}")
    table = manifest.assign(fold=np.asarray(folds, dtype=int))
    changed = table["sample_id"].astype(str).isin(flagged) & (table["fold"] != test_fold)
    if variant == "filtered":
        return table[~changed]
    if changed.any() and int(table["label"].max()) > 1:
        # The K-class relabelling needs class probabilities from models that never saw fold test_fold: not done.
        raise ValueError("the fold-safe flipped variant is binary-only; with K > 2 classes use protocol: reference or the filtered variant")
    rows = table.copy()
    rows.loc[changed, "label"] = 1 - rows.loc[changed, "label"]
    return rows


def fold_safe_manifests(manifest: pd.DataFrame, folds: np.ndarray, flagged: dict[int, set[str]], variant: str, out_dir: Path, name: str = "fold{fold}.csv") -> dict[int, Path]:
    """Write :func:`fold_safe_manifest` for every test fold k with that fold's flags
    (``flagged[k]``). Returns {fold: path}; existing files (a resumed study) are kept."""
    from tus.data.manifest import write_manifest

    paths = {}
    for fold in sorted(np.unique(folds).tolist()):
        path = out_dir / name.format(fold=fold)
        if not path.is_file():
            write_manifest(fold_safe_manifest(manifest, folds, int(fold), flagged.get(int(fold), set()), variant), path)
        paths[int(fold)] = path
    return paths


def run_fold_safe_cv(config, manifest_path: str | Path, flags: pd.DataFrame, variant: str, cv_dir: Path) -> Path:
    """The folds x seeds of ``config`` where run (k, seed) trains on ``fold_safe/fold<k>-seed<s>.csv``
    with the flags of that run (``flags``: :func:`fold_safe_flags`' table).

    The folds are those of the complete manifest under ``config.data`` (its ``folds_from`` in a
    study: the flagging CVs' and the other arms' folds), written to ``folds.csv`` as every CV
    does; finished runs (``metrics.json``) are skipped, so the study resumes.
    """
    from tus.data.manifest import load_manifest
    from tus.eval.cv_summary import collect_runs, write_summary
    from tus.stages.finetune_cv import cv_folds, finetune_callbacks, run_single, write_or_check_folds

    complete = load_manifest(manifest_path, require_labels=True, num_folds=config.data.num_folds, dicom_frames=config.data.dicom_frames, label_names=config.data.label_names)
    folds = cv_folds(config, complete)
    cv_dir.mkdir(parents=True, exist_ok=True)
    write_or_check_folds(cv_dir, complete, folds)
    if not (cv_dir / "config.yaml").is_file():
        save_config(config, cv_dir / "config.yaml")
    for seed in config.seeds:
        seed_folds = folds[seed] if isinstance(folds, dict) else folds
        mine = flags[flags["seed"].astype(int) == seed]
        flagged = {int(f): set(rows["sample_id"].astype(str)) for f, rows in mine.groupby("fold")}
        paths = fold_safe_manifests(complete, seed_folds, flagged, variant, cv_dir / "fold_safe", name=f"fold{{fold}}-seed{seed}.csv")
        for fold, path in paths.items():
            run_dir = cv_dir / "runs" / f"fold{fold}-seed{seed}"
            if (run_dir / "metrics.json").exists():
                continue
            frame = load_manifest(path, require_labels=True, dicom_frames=config.data.dicom_frames)
            run_single(config, frame, frame["fold"].astype(int).to_numpy(), fold, seed, run_dir, finetune_callbacks)
    write_summary(cv_dir, collect_runs(cv_dir), complete, config)
    return cv_dir
