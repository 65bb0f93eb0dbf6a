"""A per-fold pretraining's encoder records what its pool left out, and fine-tuning refuses it on
another fold (one line, before any run dir or training); the fold's own encoder is accepted."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.stages.test_pretrain import cli_overrides
from tus.config import load_config
from tus.data.folds import assign_folds, fold_table
from tus.data.images import read_grayscale
from tus.data.manifest import load_manifest
from tus.data.phantom import generate_phantom
from tus.models.backbones import BackboneConfig
from tus.models.weights import CheckpointError
from tus.stages.finetune_cv import FineTuneCVConfig, check_encoder_exclusion, run_cv, weights_for_run
from tus.stages.pretrain import PretrainConfig, run_pretraining

REPO = Path(__file__).resolve().parents[2]
TEST_FOLD = 0


@pytest.fixture(scope="module")
def fold_encoder(tmp_path_factory) -> tuple[Path, Path, pd.DataFrame]:
    """A 2-step pretraining on a phantom pool holding a JPEG copy and a mirrored copy of two fold-0
    images and an image of a fold-0 patient, excluding fold 0."""
    root = tmp_path_factory.mktemp("fold_encoder")
    phantom = generate_phantom(root / "phantom", num_patients=15, image_size=32, pool_size=24, seed=2)
    labeled = load_manifest(phantom.labeled_manifest, num_folds=3)
    table = fold_table(labeled, assign_folds(labeled, 3, seed=0)).assign(path=labeled["abs_path"].to_numpy())
    folds_csv = root / "folds.csv"
    table.to_csv(folds_csv, index=False)

    pool = pd.read_csv(phantom.unlabeled_manifest).drop(columns="sample_id").assign(path=lambda f: [str(phantom.unlabeled_manifest.parent / p) for p in f["path"]])
    fold0 = table[table["fold"] == TEST_FOLD].reset_index(drop=True)
    Image.open(fold0["path"][0]).convert("L").save(root / "copy.jpg", quality=90)
    Image.fromarray(read_grayscale(fold0["path"][1])[:, ::-1].copy()).save(root / "mirrored.png")
    shutil.copy(pool["path"][0], root / "same_patient.png")  # another frame, tagged with a fold-0 patient
    planted = pd.DataFrame({"path": [str(root / n) for n in ("copy.jpg", "mirrored.png", "same_patient.png")], "patient_id": ["", "", fold0["patient_id"][2]], "organ": "testicle"})
    pd.concat([pool.iloc[1:], planted], ignore_index=True).to_csv(root / "pool.csv", index=False)
    overrides = [
        *cli_overrides(root / "pool.csv", root / "runs"),
        "trainer.precision=32-true",
        "monitor.holdout_per_organ=0",
        "monitor.every_n_steps=0",
        "data.exclude_labeled=test_folds",
        f"data.labeled_manifest={folds_csv}",
        f"data.test_folds=[{TEST_FOLD}]",
    ]
    run_dir = run_pretraining(load_config(PretrainConfig, REPO / "experiments/pretrain/cpu.yaml", overrides))
    return run_dir / "encoder", folds_csv, table


def test_the_export_records_its_exclusion(fold_encoder):
    encoder, folds_csv, table = fold_encoder
    exclusion = json.loads((encoder / "config.json").read_text())["exclusion"]
    fold_patients = sorted(set(table.loc[table["fold"] == TEST_FOLD, "patient_id"].astype(str)))
    assert exclusion["mode"] == "test_folds" and exclusion["test_folds"] == [TEST_FOLD]
    assert exclusion["excluded_patients"] == fold_patients and exclusion["excluded_patient_count"] == len(fold_patients)
    assert exclusion["labeled_manifest_hash"] == hashlib.sha1(folds_csv.read_bytes()).hexdigest()
    assert exclusion["excluded_labeled_images"] == int((table["fold"] == TEST_FOLD).sum())
    assert exclusion["excluded_pool_images"] == 3  # the JPEG copy, the mirrored copy, the patient's other frame
    pool = json.loads((encoder.parent / "pool.json").read_text())
    assert sum(pool["images_per_source"].values()) == 24 - 1 + 3 - 3


def test_fine_tuning_another_fold_refuses_the_encoder(fold_encoder, tmp_path):
    encoder, folds_csv, table = fold_encoder
    frame = load_manifest(folds_csv)
    folds = frame["fold"].to_numpy()
    model = BackboneConfig(name="test_resnet", init="tus", weights=str(encoder))
    check_encoder_exclusion(model, frame, folds, TEST_FOLD)  # its own fold: accepted
    with pytest.raises(CheckpointError, match=f"left out the test patients of fold\\(s\\) \\[{TEST_FOLD}\\] .*, not those of fold 1: "):
        check_encoder_exclusion(model, frame, folds, 1)

    config = load_config(
        FineTuneCVConfig,
        REPO / "experiments/finetune/cpu.yaml",
        [f"data.manifest={folds_csv}", f"output_root={tmp_path / 'runs'}", "seeds=[0]", "model.name=test_resnet", "model.init=tus", f"model.weights={encoder}", "logging.wandb=false"],
    )
    with pytest.raises(CheckpointError, match="not those of fold 1") as error:
        run_cv(config)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "runs").exists()  # refused before any run dir


def test_weights_placeholders_name_each_runs_encoder():
    model = BackboneConfig(init="tus", weights="/out/_pretrain/abc-fold{fold}-seed{seed}/encoder")
    assert weights_for_run(model, 2, 7).weights == "/out/_pretrain/abc-fold2-seed7/encoder"
    plain = BackboneConfig(init="tus", weights="/out/encoder")
    assert weights_for_run(plain, 2, 7) is plain
