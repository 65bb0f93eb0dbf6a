"""K > 2 classes in the data layer: labels as indices or names, folds, class sizes, the 3-class phantom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.data.test_folds import manifest_frame
from tests.helpers import make_labeled_dataset
from tus.data.folds import assign_folds
from tus.data.manifest import LABEL_NAMES_ATTR, ManifestError, check_manifest, load_manifest
from tus.data.phantom import MULTICLASS_NAMES, generate_phantom

NAMES = ["benign", "malignant", "normal"]


def relabel(manifest: Path, labels: list[str]) -> Path:
    frame = pd.read_csv(manifest, dtype=str)
    frame["label"] = [labels[i % len(labels)] for i in range(len(frame))]
    frame.to_csv(manifest, index=False)
    return manifest


def test_names_are_inferred_sorted_and_indices_need_label_names(tmp_path: Path):
    manifest = make_labeled_dataset(tmp_path, patients=6, per_patient=1)
    relabel(manifest, ["normal", "benign", "malignant"])
    frame = load_manifest(manifest)
    assert frame.attrs[LABEL_NAMES_ATTR] == NAMES
    assert frame["label"].tolist() == [2, 0, 1, 2, 0, 1]
    # The same classes written as indices, with data.label_names, give the same labels.
    relabel(manifest, ["2", "0", "1"])
    assert load_manifest(manifest, label_names=NAMES)["label"].tolist() == [2, 0, 1, 2, 0, 1]
    with pytest.raises(ManifestError, match=r"label '2' is not one of \[0, 1\] \(set data.label_names for more classes\)"):
        load_manifest(manifest)


def test_unknown_name_out_of_range_index_and_mixed_labels_are_refused(tmp_path: Path):
    manifest = make_labeled_dataset(tmp_path, patients=3, per_patient=1)
    relabel(manifest, ["benign", "cyst", "3"])
    _, problems = check_manifest(manifest, label_names=NAMES)
    assert [str(p).split(": ", 1)[1] for p in problems] == [
        "label 'cyst' is not one of the classes ['benign', 'malignant', 'normal']",
        "label '3' is not 0..2 or one of ['benign', 'malignant', 'normal']",
    ]
    # Numbers and names mixed, no data.label_names: 0/1 labels, the names refused.
    relabel(manifest, ["benign", "1", "normal"])
    _, problems = check_manifest(manifest)
    assert [str(p).split(": ", 1)[1] for p in problems] == [f"label '{name}' is not one of [0, 1] (set data.label_names for more classes)" for name in ("benign", "normal")]


def test_a_class_with_fewer_patients_than_folds_is_refused_in_one_line(tmp_path: Path):
    manifest = make_labeled_dataset(tmp_path, patients=7, per_patient=2)
    frame = pd.read_csv(manifest, dtype=str)
    # Patients 0-2 benign, 3-5 normal, only patient 6 malignant: 1 patient for 3 folds.
    frame["label"] = [NAMES[0] if int(p[1:]) < 3 else NAMES[2] if int(p[1:]) < 6 else NAMES[1] for p in frame["patient_id"]]
    frame.to_csv(manifest, index=False)
    with pytest.raises(ManifestError) as error:
        load_manifest(manifest, num_folds=3)
    assert "\n" not in str(error.value)
    assert str(error.value).endswith("class 1 (malignant) has 1 patient(s), fewer than the 3 folds: some test fold would have no sample of this class")


@st.composite
def three_class_manifests(draw):
    folds = draw(st.integers(2, 4))
    counts = [draw(st.integers(folds, 10)) for _ in range(3)]
    labels = [k for k, count in enumerate(counts) for _ in range(count)]
    sizes = draw(st.lists(st.integers(1, 5), min_size=len(labels), max_size=len(labels)))
    return manifest_frame(sizes, labels), folds, draw(st.integers(0, 10_000))


@settings(max_examples=40, deadline=None)
@given(three_class_manifests())
def test_stratified_grouped_folds_keep_every_class_in_every_fold(case):
    frame, num_folds, seed = case
    folds = assign_folds(frame, num_folds, seed)
    assert (pd.Series(folds).groupby(frame["patient_id"]).nunique() == 1).all()
    for fold in range(num_folds):
        assert set(frame.loc[folds == fold, "label"]) == {0, 1, 2}


def test_three_class_phantom_labels_patterns_and_noise(tmp_path: Path):
    paths = generate_phantom(tmp_path / "p", num_patients=12, images_per_patient=(1, 2), image_size=32, positive_fraction=0.5, pool_size=0, classes=3, label_noise=0.25)
    frame = pd.read_csv(paths.labeled_manifest)
    per_patient = frame.groupby("patient_id")["clean_label"].first()
    # round(0.5 * 12) = 6 lesioned patients, alternating focal / diffuse: 3 and 3.
    assert per_patient.value_counts().sort_index().tolist() == [6, 3, 3]
    noisy = frame["label"] != frame["clean_label"]
    assert noisy.sum() == round(0.25 * len(frame))
    assert set(frame["label"]) <= {0, 1, 2}
    assert frame["class_name"].tolist() == [MULTICLASS_NAMES[k] for k in frame["label"]]


def test_two_class_phantom_is_unchanged_by_the_classes_option(tmp_path: Path):
    kwargs = dict(num_patients=6, images_per_patient=(1, 2), image_size=32, pool_size=3, label_noise=0.2)
    default, explicit = generate_phantom(tmp_path / "a", **kwargs), generate_phantom(tmp_path / "b", classes=2, **kwargs)
    assert default.labeled_manifest.read_text() == explicit.labeled_manifest.read_text()
    for image in sorted((default.root / "labeled" / "images").iterdir()):
        assert image.read_bytes() == (explicit.root / "labeled" / "images" / image.name).read_bytes()
    with pytest.raises(ValueError, match="classes must be 2 or 3"):
        generate_phantom(tmp_path / "c", classes=4)
    assert np.array_equal(sorted(pd.read_csv(default.labeled_manifest)["label"].unique()), [0, 1])
