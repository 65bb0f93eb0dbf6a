"""The fold-safe synthetic study (studies/synthetic, shrunk): one conditional generator per test fold,
trained without that fold's patients; its filtered samples train that fold only; the arms (real,
real + synthetic, synthetic only) are tested on the same real folds and compared in one table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from tus.data.phantom import generate_phantom
from tus.studies import runner, schema

STUDIES = Path(__file__).resolve().parents[2] / "experiments" / "studies"
TINY = ["model.init=scratch", "model.name=test_resnet", "logging.wandb=false"]


ARMS = ["real", "real_synthetic"]  # synthetic_only's datamodule is covered by tests/stages/test_synthetic_finetune.py


@pytest.fixture(scope="module")
def synthetic_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_study")
    phantom = generate_phantom(root / "phantom", num_patients=12, images_per_patient=(2, 2), image_size=32, positive_fraction=0.5, pool_size=0, seed=3)
    variables = {"TUS_LABELED": str(phantom.labeled_manifest)}
    extra = schema.StageOverrides(finetune=TINY, diffusion=["logging.wandb=false"], synthetic=["filter_k=null", "device=cpu"])
    study = schema.load_study(STUDIES / "synthetic.yaml")
    out = runner.run_study(study, root / "runs", arms=ARMS, variables=variables, shrink=True, extra=extra)
    return out


pytestmark = pytest.mark.slow  # two diffusion trainings, samplings and two CVs: ~1 min of CPU


def test_each_fold_has_its_own_generator_and_no_test_fold_sees_a_sample(synthetic_study):
    out = synthetic_study
    (table_path,) = (out / "folds").glob("*.csv")
    folds = pd.read_csv(table_path, dtype={"sample_id": str, "patient_id": str})
    assert not folds["sample_id"].str.startswith("synthetic:").any()
    for fold in (0, 1):  # --shrink: 2 folds, seed 0 (drawn per seed, as studies do)
        test = folds[(folds["fold"] == fold) & (folds["seed"] == 0)]
        generator = out / "_synthetic" / f"seed0-fold{fold}"
        pool = json.loads((generator / "diffusion" / "pool.json").read_text())["excluded_labeled"]
        assert pool["test_folds"] == [fold] and pool["excluded_patients"] == sorted(set(test["patient_id"]))
        trained_on = sum(json.loads((generator / "diffusion" / "pool.json").read_text())["images_per_source"].values())
        assert trained_on == len(folds[(folds["seed"] == 0)]) - len(test)  # the training patients' images only
        record = json.loads((generator / "synthetic" / "generator.json").read_text())
        assert record["exclusion"]["excluded_patients"] == sorted(set(test["patient_id"]))
        reference = pd.read_csv(generator / "train.csv", dtype={"sample_id": str})
        assert not set(reference["sample_id"]) & set(test["sample_id"])  # the filter's real reference holds no test image
        kept = pd.read_csv(generator / "synthetic" / "manifest.csv")
        assert kept["label"].value_counts().to_dict() == {0: 8, 1: 8}  # shrink: 8 per class, unfiltered here
        for arm in ARMS:
            run = out / arm / "finetune" / "runs" / f"fold{fold}-seed0"
            predictions = pd.read_csv(run / "predictions.csv", dtype={"sample_id": str})
            assert set(predictions["sample_id"]) == set(test["sample_id"])  # the same real test images in every arm
            if arm == "real":
                assert not (run / "train_manifest.csv").exists()
                continue
            training = pd.read_csv(run / "train_manifest.csv", dtype={"sample_id": str})
            synthetic = training[training["synthetic"]]
            assert len(synthetic) and all(Path(p).is_relative_to(generator / "synthetic") for p in synthetic["path"])
            assert set(training.loc[~training["synthetic"], "sample_id"]) == set(folds.loc[(folds["fold"] != fold) & (folds["seed"] == 0), "sample_id"])


def test_the_table_compares_the_arms_paired(synthetic_study):
    table = (synthetic_study / "table.md").read_text()
    for row in ("| real |", "| real + synthetic"):
        assert row in table
    assert "Paired" in table and "Not compared" not in table
