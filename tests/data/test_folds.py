"""Patient-grouped stratified folds: no leakage, balanced classes, deterministic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tus.data.folds import FoldError, assign_folds, assign_folds_for_seed, check_folds


def manifest_frame(patient_sizes: list[int], patient_labels: list[int]) -> pd.DataFrame:
    rows = []
    for p, (size, label) in enumerate(zip(patient_sizes, patient_labels)):
        rows += [{"sample_id": f"{p}-{i}", "path": f"{p}-{i}.png", "patient_id": f"P{p}", "label": label} for i in range(size)]
    return pd.DataFrame(rows)


@st.composite
def random_manifests(draw):
    folds = draw(st.integers(2, 5))
    positives = draw(st.integers(folds, 12))
    negatives = draw(st.integers(folds, 30))
    labels = [1] * positives + [0] * negatives
    sizes = draw(st.lists(st.integers(1, 6), min_size=len(labels), max_size=len(labels)))
    return manifest_frame(sizes, labels), folds, draw(st.integers(0, 10_000))


@settings(max_examples=60, deadline=None)
@given(random_manifests())
def test_no_patient_in_two_folds_and_every_fold_has_both_classes(case):
    frame, num_folds, seed = case
    folds = assign_folds(frame, num_folds, seed)
    assert set(folds.tolist()) == set(range(num_folds))
    per_patient = pd.Series(folds).groupby(frame["patient_id"]).nunique()
    assert (per_patient == 1).all()
    for fold in range(num_folds):
        assert set(frame.loc[folds == fold, "label"]) == {0, 1}


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 9), st.integers(3, 40), st.integers(2, 5), st.integers(0, 1000))
def test_stratification_within_one_sample_per_class_for_single_image_patients(positives, negatives, num_folds, seed):
    if min(positives, negatives) < num_folds:
        return
    frame = manifest_frame([1] * (positives + negatives), [1] * positives + [0] * negatives)
    folds = assign_folds(frame, num_folds, seed)
    for label in (0, 1):
        counts = np.bincount(folds[frame["label"].to_numpy() == label], minlength=num_folds)
        assert counts.max() - counts.min() <= 1, counts


def test_deterministic_by_seed_and_seed_matters():
    frame = manifest_frame([2] * 40, [1] * 10 + [0] * 30)
    a, b, c = assign_folds(frame, 3, 7), assign_folds(frame, 3, 7), assign_folds(frame, 3, 8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_check_folds_names_leaking_patient_and_empty_class():
    frame = manifest_frame([2, 1, 1, 1], [1, 1, 0, 0])
    with pytest.raises(FoldError, match=r"patient 'P0' is in folds \[0, 1\]"):
        check_folds(frame, np.array([0, 1, 0, 1, 0]), 2)
    with pytest.raises(FoldError, match="fold 0 has no sample of class 0"):
        check_folds(frame, np.array([0, 0, 0, 1, 1]), 2)


def test_too_few_patients():
    with pytest.raises(FoldError, match="2 patient"):
        assign_folds(manifest_frame([3, 3], [0, 1]), 3, 0)


def test_folds_fixed_across_seeds_or_redrawn_per_seed():
    frame = manifest_frame([2] * 30, [1] * 10 + [0] * 20)
    fixed = [assign_folds_for_seed(frame, 3, fold_seed=5, run_seed=seed) for seed in range(4)]
    assert all((f == assign_folds(frame, 3, 5)).all() for f in fixed)
    redrawn = [assign_folds_for_seed(frame, 3, fold_seed=5, run_seed=seed, per_seed=True) for seed in range(4)]
    for seed, folds in enumerate(redrawn):
        assert (folds == assign_folds(frame, 3, seed)).all()  # the run seed is the splitter's seed
        check_folds(frame, folds, 3)
    assert len({tuple(f) for f in redrawn}) == 4


def test_a_fold_table_gives_a_filtered_or_relabelled_manifest_the_same_folds():
    from tus.data.folds import fold_table, folds_from_table

    frame = manifest_frame([2, 1, 3, 2, 1, 2, 2, 1, 3], [1, 0, 0, 1, 0, 1, 0, 1, 0])
    per_seed = {seed: assign_folds(frame, 3, seed) for seed in (4, 5)}
    table = pd.concat([fold_table(frame, f).assign(seed=s) for s, f in per_seed.items()])
    # A filtered manifest (two images dropped, shuffled) keeps each remaining image's fold, per seed
    filtered = frame[~frame["sample_id"].isin(["2-0", "6-1"])].sample(frac=1.0, random_state=0)
    folds = folds_from_table(filtered, table, 3, [4, 5], per_seed=True)
    for seed in (4, 5):
        expected = dict(zip(frame["sample_id"], per_seed[seed]))
        assert folds[seed].tolist() == [expected[i] for i in filtered["sample_id"]]
    # A relabelled manifest: the same folds (a table is looked up by sample id, not label)
    flipped = frame.assign(label=np.where(frame["sample_id"] == "0-0", 0, frame["label"]))
    assert folds_from_table(flipped, table, 3, [4], per_seed=True)[4].tolist() == per_seed[4].tolist()
    # Refused, naming what is wrong: an image without a fold, a seed without folds, the other design
    extra = pd.concat([frame, pd.DataFrame([{"sample_id": "new", "path": "new.png", "patient_id": "P99", "label": 0}])])
    with pytest.raises(FoldError, match=r"1 manifest image\(s\) have no fold for seed 4, e.g. \['new'\]"):
        folds_from_table(extra, table, 3, [4], per_seed=True)
    with pytest.raises(FoldError, match=r"no folds for seed\(s\) \[7\]"):
        folds_from_table(frame, table, 3, [4, 7], per_seed=True)
    with pytest.raises(FoldError, match="folds_per_seed=true"):
        folds_from_table(frame, table, 3, [4], per_seed=False)
    with pytest.raises(FoldError, match="num_folds=2"):
        folds_from_table(frame, table, 2, [4], per_seed=True)


def test_images_tested_and_distinct_splits_read_a_fold_table():
    from tus.data.folds import distinct_splits, images_tested

    table = pd.DataFrame({"sample_id": list("abcdabcd"), "fold": [0, 0, 1, 1, 0, 1, 0, 1], "seed": [0] * 4 + [1] * 4})
    assert images_tested(table) == {(0, 0): {"a", "b"}, (1, 0): {"c", "d"}, (0, 1): {"a", "c"}, (1, 1): {"b", "d"}}
    assert distinct_splits(table) == 2
    # the same partition with the fold numbers swapped is the same split
    same = table.iloc[:4]
    assert distinct_splits(pd.concat([same, same.assign(seed=1, fold=1 - same["fold"])])) == 1
    one = table.iloc[:4].drop(columns="seed")
    assert distinct_splits(one) == 1 and images_tested(one, seeds=[2, 3])[(1, 3)] == {"c", "d"}
