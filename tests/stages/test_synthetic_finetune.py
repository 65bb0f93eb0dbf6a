"""Synthetic images in fine-tuning (``data.synthetic``): training folds only, marked, fold-safe.

Each fold k gets a hand-made sample folder whose ``generator.json`` says its generator left out fold
k's test patients (what ``tus sample`` writes from a diffusion run's ``pool.json``). The CV must put
the synthetic images in the training rows of every run and in no test fold, mark them in every
table it writes, and refuse (one line, before any run dir) samples of a generator that saw a test
fold's patients.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import make_labeled_dataset
from tests.stages.test_finetune_cv import tiny_config as cv_config
from tus.config import ConfigError
from tus.data.datamodules import LabeledDataModule
from tus.data.folds import assign_folds, fold_table
from tus.data.images import write_grayscale
from tus.data.manifest import load_manifest
from tus.data.synthetic import SyntheticLeakError, read_synthetic
from tus.stages.finetune_cv import run_cv

PER_CLASS_SAMPLES = 4


def tiny_config(manifest: Path, out: Path, *overrides: str):
    return cv_config(manifest, out, "data.num_folds=2", *overrides)


def sample_folder(root: Path, excluded_patients: list[str] | None, test_folds: list[int], seed: int = 0) -> Path:
    """A folder as ``tus sample --labels-from`` leaves it: PNGs, manifest.csv (path, sample_id, label) and
    generator.json (None: a generator trained on every labelled patient, exclusion mode none)."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(2 * PER_CLASS_SAMPLES):
        label = index % 2
        image = rng.integers(40, 90, size=(32, 32), dtype=np.uint8)
        if label:
            image[8:16, 8:16] = 230
        write_grayscale(root / f"{index:06d}.png", image)
        rows.append({"index": index, "path": f"{index:06d}.png", "sample_id": f"respaced10-seed0-{index:06d}", "label": label, "guidance": 1.0})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    exclusion = {"mode": "none"} if excluded_patients is None else {"mode": "test_folds", "test_folds": test_folds, "labeled_manifest": "folds.csv", "excluded_patients": excluded_patients}
    (root / "generator.json").write_text(json.dumps({"generator": "unet", "exclusion": exclusion}))
    return root


@pytest.fixture
def per_fold_samples(tmp_path: Path):
    manifest = make_labeled_dataset(tmp_path / "data", patients=12, per_patient=2)
    frame = load_manifest(manifest)
    folds = assign_folds(frame, 2, 0)  # as finetune-cv draws them (data.num_folds=2, data.fold_seed=0)
    for fold in range(2):
        patients = sorted(set(frame.loc[folds == fold, "patient_id"].astype(str)))
        sample_folder(tmp_path / f"samples-fold{fold}", patients, [fold], seed=fold)
    return manifest, frame, folds


def test_synthetic_images_train_every_fold_and_are_tested_in_none(tmp_path: Path, per_fold_samples):
    manifest, frame, folds = per_fold_samples
    config = tiny_config(manifest, tmp_path / "runs", "trainer.max_epochs=1", f"data.synthetic.source={tmp_path}/samples-fold{{fold}}", "data.synthetic.per_class=3")
    run_dir = run_cv(config)
    table = pd.read_csv(run_dir / "folds.csv", dtype={"sample_id": str})
    assert not table["sample_id"].str.startswith("synthetic:").any() and len(table) == len(frame)
    for fold in range(2):
        run = run_dir / "runs" / f"fold{fold}-seed0"
        predictions = pd.read_csv(run / "predictions.csv", dtype={"sample_id": str})
        # The test fold is exactly the fold's real images: no synthetic image, none missing.
        assert set(predictions["sample_id"]) == set(table.loc[table["fold"] == fold, "sample_id"])
        training = pd.read_csv(run / "train_manifest.csv", dtype={"sample_id": str, "patient_id": str})
        synthetic = training[training["synthetic"]]
        assert len(synthetic) == 2 * 3 and sorted(synthetic["label"].value_counts().tolist()) == [3, 3]
        assert synthetic["sample_id"].str.startswith("synthetic:").all() and (synthetic["patient_id"] == synthetic["sample_id"]).all()
        assert all(Path(p).parent == tmp_path / f"samples-fold{fold}" for p in synthetic["path"])  # this fold's generator only
        real = training[~training["synthetic"]]
        assert set(real["sample_id"]) == set(table.loc[table["fold"] != fold, "sample_id"])
        record = json.loads((run / "metrics.json").read_text())
        assert record["synthetic_images"] == 6 and record["real_training_images"] == len(real)
        losses = pd.read_csv(run / "losses.csv", dtype={"sample_id": str})
        assert losses["sample_id"].str.startswith("synthetic:").any()  # they did train


def test_samples_of_a_generator_that_saw_the_test_fold_are_refused(tmp_path: Path, per_fold_samples):
    manifest, frame, folds = per_fold_samples
    fold0 = sorted(set(frame.loc[folds == 0, "patient_id"].astype(str)))
    fold1 = sorted(set(frame.loc[folds == 1, "patient_id"].astype(str)))
    # Fold 0's samples for every fold: the generator trained on folds 1 and 2's test patients.
    config = tiny_config(manifest, tmp_path / "runs", "trainer.max_epochs=1", f"data.synthetic.source={tmp_path}/samples-fold0")
    with pytest.raises(SyntheticLeakError) as error:
        run_cv(config)
    message = str(error.value)
    assert "\n" not in message and "left out the test patients of fold(s) [0]" in message and "not those of fold 1" in message
    assert f"{len(fold1)} of fold 1's {len(fold1)} test patients (e.g. {fold1[0]}" in message and fold0[0] not in message.split("(e.g.")[1]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # refused before any run dir
    # A generator trained on every labelled patient: refused too, unless asked for (the reference's protocol).
    sample_folder(tmp_path / "everyone", None, [])
    with pytest.raises(SyntheticLeakError, match="whose pool left no labelled patient out, so it may hold fold 0's test patients"):
        run_cv(tiny_config(manifest, tmp_path / "runs", f"data.synthetic.source={tmp_path}/everyone"))
    (tmp_path / "everyone" / "generator.json").unlink()
    with pytest.raises(SyntheticLeakError, match="records no generator"):
        run_cv(tiny_config(manifest, tmp_path / "runs", f"data.synthetic.source={tmp_path}/everyone"))


def test_ratio_only_and_the_inner_split_stay_real(tmp_path: Path, per_fold_samples):
    manifest, frame, folds = per_fold_samples
    synthetic = read_synthetic(tmp_path / "samples-fold0")
    config = tiny_config(manifest, tmp_path / "runs", "selection=inner_val", "data.synthetic.source=x", "data.synthetic.ratio=0.25").data
    module = LabeledDataModule(config, frame, folds, 0, seed=0, inner_validation=True, synthetic=synthetic)
    module.setup("fit")
    train = module.train_frame
    real_counts = train.loc[~train["synthetic"].astype(bool), "label"].value_counts()
    synthetic_counts = train.loc[train["synthetic"].astype(bool), "label"].value_counts()
    for label in (0, 1):  # round(0.25 x the class's real training images), counted by hand
        assert synthetic_counts.get(label, 0) == round(0.25 * real_counts[label])
    assert not any(i.startswith("synthetic:") for i in module.val_set.sample_ids + module.test_set.sample_ids)
    only = tiny_config(manifest, tmp_path / "runs", "data.synthetic.source=x", "data.synthetic.only=true").data
    module = LabeledDataModule(only, frame, folds, 0, seed=0, synthetic=synthetic)
    module.setup("fit")
    assert module.train_set.sample_ids == synthetic["sample_id"].tolist()  # every image, none real
    assert set(module.test_set.sample_ids) == set(fold_table(frame, folds).query("fold == 0")["sample_id"].astype(str))
    too_many = tiny_config(manifest, tmp_path / "runs", "data.synthetic.source=x", "data.synthetic.per_class=5").data
    with pytest.raises(ValueError, match="class 0 has 4 synthetic image"):
        LabeledDataModule(too_many, frame, folds, 0, seed=0, synthetic=synthetic).setup("fit")
    with pytest.raises(ConfigError, match="refit=true with data.synthetic.source"):
        run_cv(tiny_config(manifest, tmp_path / "runs", f"data.synthetic.source={tmp_path}/samples-fold{{fold}}", "refit=true"))
    with pytest.raises(ConfigError, match="need data.synthetic.source"):
        run_cv(tiny_config(manifest, tmp_path / "runs", "data.synthetic.only=true"))
    with pytest.raises(ConfigError, match="per_class or ratio, not both"):
        tiny_config(manifest, tmp_path / "runs", "data.synthetic.source=x", "data.synthetic.per_class=2", "data.synthetic.ratio=1")
