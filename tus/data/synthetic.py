"""Generated, labelled images for the training folds of a CV (``data.synthetic``), kept fold-safe.

A synthetic source is a ``tus sample --label/--labels-from`` folder or a ``tus filter --per-class``
folder (or its ``manifest.csv``): images with the class they were drawn for. Such a folder carries
``generator.json``, the exclusion its diffusion model's pool recorded (``tus sample`` writes it
from the run's ``pool.json``; ``tus filter`` copies it): the labelled patients whose images were
left out. Fold k's training may use samples only of a generator that left out fold k's test
patients (:func:`check_generator_exclusion`), as fine-tuning refuses another fold's encoder: a
generator trained on them would pass their images into training through its samples.

Synthetic rows are marked everywhere they are written: ``sample_id`` ``synthetic:<source id>``,
``patient_id`` likewise (each generated image is its own "patient": it can never share a group
with a real one), and ``synthetic`` = True. They join the training rows only: never a test fold
and never the inner validation split (:class:`tus.data.datamodules.LabeledDataModule`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tus.data.configs import SyntheticDataConfig as SyntheticDataConfig
from tus.data.images import DataError
from tus.data.manifest import load_manifest

GENERATOR_FILE = "generator.json"
MANIFEST_FILE = "manifest.csv"
SYNTHETIC_PREFIX = "synthetic:"
PLACEHOLDERS = ("{fold}", "{seed}")


class SyntheticLeakError(ValueError):
    """A synthetic source whose generator may have seen the test fold's patients."""


def source_for_run(source: str, fold: int, seed: int) -> Path:
    """``source`` with ``{fold}``/``{seed}`` filled in for the run (fold, seed)."""
    return Path(source.replace("{fold}", str(fold)).replace("{seed}", str(seed)))


def manifest_of(source: str | Path) -> Path:
    """The manifest of a synthetic source: the file itself, or a folder's ``manifest.csv``."""
    source = Path(source)
    manifest = source / MANIFEST_FILE if source.is_dir() else source
    if not manifest.is_file():
        raise DataError(f"data.synthetic.source={source}: no {MANIFEST_FILE} (give a tus sample --label or tus filter --per-class folder)")
    return manifest


def read_generator_record(source: str | Path) -> dict | None:
    """The ``generator.json`` beside a synthetic source's manifest (None: the source records none)."""
    path = manifest_of(source).parent / GENERATOR_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_synthetic(source: str | Path) -> pd.DataFrame:
    """The labelled rows of a synthetic source, marked (see the module doc): ``abs_path``, ``path``,
    ``sample_id``, ``patient_id``, ``label``, ``synthetic``."""
    manifest = manifest_of(source)
    frame = load_manifest(manifest, require_labels=True, require_patients=False, decode_images=False)
    if frame.empty:
        raise DataError(f"{manifest}: no synthetic images")
    ids = [SYNTHETIC_PREFIX + str(i) for i in frame["sample_id"]]
    return pd.DataFrame({"path": frame["abs_path"].astype(str), "abs_path": frame["abs_path"].astype(str), "sample_id": ids, "patient_id": ids, "label": frame["label"].astype(int), "synthetic": True})


def check_generator_exclusion(source: str | Path, frame: pd.DataFrame, folds: np.ndarray, fold: int, allow_unexcluded: bool = False) -> None:
    """Refuse (one line) a synthetic source whose generator did not leave out fold ``fold``'s test patients.

    The generator's pool must have left out every test patient of the fold (its ``generator.json``
    ``exclusion``, as a tus encoder export records it). A source with no record, or a generator
    trained on the whole labelled set (``mode: none``), is refused unless ``allow_unexcluded``.
    """
    record = read_generator_record(source)
    exclusion = (record or {}).get("exclusion") or {"mode": "none"}
    test_patients = set(frame.loc[np.asarray(folds).astype(int) == fold, "patient_id"].astype(str))
    if exclusion.get("mode", "none") in ("none", "unknown"):
        if allow_unexcluded:
            return
        why = "records no generator (no generator.json)" if record is None else f"comes from a generator ({record.get('generator')}) whose pool left no labelled patient out"
        raise SyntheticLeakError(
            f"data.synthetic.source={source}: {why}, so it may hold fold {fold}'s test patients; give samples of a generator trained without them "
            "(tus diffusion with data.exclude_labeled=test_folds, or a synthetic study), or set data.synthetic.allow_unexcluded=true for the reference's protocol"
        )
    missing = sorted(test_patients - set(map(str, exclusion.get("excluded_patients", []))))
    if missing:
        what = "every labelled patient" if exclusion["mode"] == "all" else f"the test patients of fold(s) {exclusion.get('test_folds')}"
        raise SyntheticLeakError(
            f"data.synthetic.source={source}: its generator's pool left out {what} of {exclusion.get('labeled_manifest')}, not those of fold {fold}: "
            f"{len(missing)} of fold {fold}'s {len(test_patients)} test patients (e.g. {', '.join(missing[:3])}) may be in its pool; give fold {fold}'s samples (data.synthetic.source with {{fold}})"
        )


def select_synthetic(synthetic: pd.DataFrame, train_labels: np.ndarray, config: SyntheticDataConfig, seed: int, source: str | Path = "") -> pd.DataFrame:
    """The synthetic rows a run trains on: per class, ``per_class`` images, or ``ratio`` x the class's real
    training images (rounded), or all; drawn at random by ``seed`` (the same rows for the same seed). A class
    with fewer synthetic images than asked is refused."""
    if config.per_class is None and config.ratio is None:
        return synthetic.reset_index(drop=True)
    real_counts = dict(zip(*np.unique(np.asarray(train_labels, dtype=int), return_counts=True)))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted(set(real_counts) | set(synthetic["label"].astype(int))):
        rows = np.flatnonzero(synthetic["label"].to_numpy() == label)
        wanted = config.per_class if config.per_class is not None else int(round((config.ratio or 0.0) * real_counts.get(label, 0)))
        if wanted > len(rows):
            asked = f"per_class={config.per_class}" if config.per_class is not None else f"ratio={config.ratio} x {real_counts.get(label, 0)} real training images"
            raise DataError(f"data.synthetic.source={source}: class {label} has {len(rows)} synthetic image(s), fewer than the {wanted} asked ({asked}); sample more or ask fewer")
        chosen.append(np.sort(rng.choice(rows, size=wanted, replace=False)))
    return synthetic.iloc[np.concatenate(chosen) if chosen else []].reset_index(drop=True)
