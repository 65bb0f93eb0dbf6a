"""Patient-grouped, class-stratified K-fold assignment and its invariants.

A patient's images always share one fold (no leakage), each fold holds every class, and the
assignment is a pure function of (manifest, K, seed).
"""

from __future__ import annotations

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
