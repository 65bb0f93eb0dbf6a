"""Patient-grouped, class-stratified K-fold assignment and its invariants.

A patient's images always share one fold (no leakage), each fold holds every class, and the
assignment is a pure function of (manifest, K, seed). A fold table written by one CV
(``folds.csv``) can be given to another (``data.folds_from``): every row keeps its fold there,
so arms that drop or relabel rows of one labelled set are tested on the same patients
(:func:`folds_from_table`); :func:`images_tested` reads back which images each run tested on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold


class FoldError(ValueError):
    """A fold assignment breaks an invariant; the message names the patient, class or fold."""


def assign_folds(frame: pd.DataFrame, num_folds: int, seed: int) -> np.ndarray:
    """Fold index (0..K-1) for each row: StratifiedGroupKFold on label, grouped by patient."""
    if num_folds < 2:
        raise FoldError(f"need at least 2 folds, got {num_folds}")
    labels = frame["label"].to_numpy()
    groups = frame["patient_id"].astype(str).to_numpy()
    if groups.size and len(np.unique(groups)) < num_folds:
        raise FoldError(f"{len(np.unique(groups))} patient(s) cannot fill {num_folds} folds")
    splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    folds = np.full(len(frame), -1, dtype=int)
    for fold, (_, test_index) in enumerate(splitter.split(np.zeros(len(frame)), labels, groups)):
        folds[test_index] = fold
    check_folds(frame, folds, num_folds)
    return folds


def assign_folds_for_seed(frame: pd.DataFrame, num_folds: int, fold_seed: int, run_seed: int, per_seed: bool = False) -> np.ndarray:
    """The folds of the runs of seed ``run_seed``.

    ``per_seed=False`` (tus' default): one split for every seed, drawn with ``fold_seed``, so the
    seeds differ only in training randomness. ``per_seed=True`` (the reference code): the folds
    are re-drawn for each seed with ``run_seed`` as the splitter's seed (``fold_seed`` unused),
    so the spread over seeds includes the split's.
    """
    return assign_folds(frame, num_folds, run_seed if per_seed else fold_seed)


def check_folds(frame: pd.DataFrame, folds: np.ndarray, num_folds: int) -> None:
    """Raise :class:`FoldError` if a patient spans folds or a fold lacks a class."""
    table = pd.DataFrame({"patient_id": frame["patient_id"].astype(str).to_numpy(), "fold": folds})
    spread = table.groupby("patient_id")["fold"].nunique()
    leaking = spread[spread > 1]
    if not leaking.empty:
        patient = leaking.index[0]
        where = sorted(table.loc[table["patient_id"] == patient, "fold"].unique().tolist())
        raise FoldError(f"patient '{patient}' is in folds {where} ({len(leaking)} patient(s) leak across folds)")
    if (folds < 0).any() or (folds >= num_folds).any():
        raise FoldError(f"fold indices must lie in 0..{num_folds - 1}")
    labels = frame["label"].to_numpy()
    for fold in range(num_folds):
        present = set(labels[folds == fold].tolist())
        for label in sorted(set(labels.tolist())):
            if label not in present:
                raise FoldError(f"fold {fold} has no sample of class {label}; use fewer folds or more patients")


def fold_table(frame: pd.DataFrame, folds: np.ndarray) -> pd.DataFrame:
    """The table written as ``folds.csv``: one row per image with its fold."""
    return pd.DataFrame(
        {
            "sample_id": frame["sample_id"].to_numpy(),
            "path": frame["path"].to_numpy(),
            "patient_id": frame["patient_id"].to_numpy(),
            "label": frame["label"].to_numpy(),
            "fold": folds,
        }
    )


def read_fold_table(path: str | Path) -> pd.DataFrame:
    """A ``folds.csv`` (``sample_id``, ``fold``, and ``seed`` when folds were drawn per seed)."""
    path = Path(path)
    if not path.is_file():
        raise FoldError(f"{path}: no such fold table (a folds.csv written by finetune-cv or a study)")
    table = pd.read_csv(path, dtype={"sample_id": str, "patient_id": str})
    missing = [c for c in ("sample_id", "fold") if c not in table.columns]
    if missing:
        raise FoldError(f"{path}: fold table lacks column(s) {missing}")
    return table


def folds_from_table(frame: pd.DataFrame, table: pd.DataFrame, num_folds: int, seeds: list[int], per_seed: bool, source: str = "fold table") -> np.ndarray | dict[int, np.ndarray]:
    """Each manifest row's fold as ``table`` gives it (by ``sample_id``): an array, or one per
    seed when the table has a ``seed`` column (then ``per_seed`` must be set, and every seed be
    in it). Rows of the table that the manifest lacks (a filtered arm) are ignored; a manifest
    row the table lacks is refused, since it would need a fold of its own."""
    has_seed = "seed" in table.columns
    if has_seed != per_seed:
        drawn = "per seed (it has a seed column)" if has_seed else "once for every seed (no seed column)"
        raise FoldError(f"{source}: its folds were drawn {drawn}; set data.folds_per_seed={str(has_seed).lower()}")
    ids = frame["sample_id"].astype(str)

    def lookup(rows: pd.DataFrame, what: str) -> np.ndarray:
        folds = rows.drop_duplicates("sample_id").set_index("sample_id")["fold"]
        absent = sorted(set(ids) - set(folds.index))
        if absent:
            raise FoldError(f"{source}: {len(absent)} manifest image(s) have no fold{what}, e.g. {absent[:3]}; the table must come from this labelled set")
        values = folds.loc[ids].astype(int).to_numpy()
        if len(np.unique(folds.to_numpy())) != num_folds:
            raise FoldError(f"{source}: holds {len(np.unique(folds.to_numpy()))} folds{what}, the config asks for data.num_folds={num_folds}")
        check_folds(frame, values, num_folds)
        return values

    if not has_seed:
        return lookup(table, "")
    missing = sorted(set(seeds) - set(table["seed"].astype(int)))
    if missing:
        raise FoldError(f"{source}: has no folds for seed(s) {missing}")
    return {seed: lookup(table[table["seed"].astype(int) == seed], f" for seed {seed}") for seed in seeds}


def images_tested(table: pd.DataFrame, seeds: list[int] | None = None) -> dict[tuple[int, int], frozenset[str]]:
    """The sample ids each run (fold, seed) was tested on, from a ``folds.csv``. Without a
    ``seed`` column the one split serves every seed: give ``seeds`` to expand it."""
    ids = table["sample_id"].astype(str).tolist()
    folds = table["fold"].astype(int).tolist()
    run_seeds = table["seed"].astype(int).tolist() if "seed" in table.columns else [None] * len(ids)
    groups: dict[tuple[int, int | None], set[str]] = {}
    for sample, fold, seed in zip(ids, folds, run_seeds):
        groups.setdefault((fold, seed), set()).add(sample)
    if "seed" in table.columns:
        return {(f, s): frozenset(members) for (f, s), members in groups.items() if s is not None}
    return {(f, s): frozenset(members) for (f, _), members in groups.items() for s in (seeds or [0])}


def distinct_splits(table: pd.DataFrame) -> int:
    """How many different partitions into folds a ``folds.csv`` holds (one per seed when they were
    re-drawn per seed, unless two seeds happened to draw the same)."""
    if "seed" not in table.columns:
        return 1
    by_seed: dict[int, dict[int, set[str]]] = {}
    for sample, fold, seed in zip(table["sample_id"].astype(str).tolist(), table["fold"].astype(int).tolist(), table["seed"].astype(int).tolist()):
        by_seed.setdefault(seed, {}).setdefault(fold, set()).add(sample)
    return len({frozenset(frozenset(members) for members in folds.values()) for folds in by_seed.values()})
