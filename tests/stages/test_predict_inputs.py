"""tus predict on images as they come: screenshots cut into views by the recipe the training set was
cropped with, and DICOM cine loops by the model's own frame choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.data.test_crop import DUAL_VIEW_BOXES, screenshot
from tests.helpers import predict_atol
from tests.stages.test_finetune_cv import tiny_config
from tus.data.crop import crop_manifest
from tus.data.images import write_dicom, write_grayscale
from tus.stages.finetune_cv import run_cv
from tus.stages.predict import read_inputs, run_predict


def test_predict_cuts_screenshots_as_the_training_set_was_cropped(tmp_path: Path):
    # Dual-view scanner screenshots; the positives' views carry a bright square (learnable in one epoch).
    rows = []
    for p in range(8):
        image = screenshot(p)
        if p % 2:
            for x0, y0, _, _ in DUAL_VIEW_BOXES:
                image[y0 + 40 : y0 + 120, x0 + 40 : x0 + 120] = 240
        write_grayscale(tmp_path / "shots" / f"s{p}.png", image)
        rows.append({"path": f"s{p}.png", "patient_id": f"P{p}", "label": p % 2, "organ": "testicle"})
    pd.DataFrame(rows).to_csv(tmp_path / "shots" / "manifest.csv", index=False)
    cropped = crop_manifest(tmp_path / "shots" / "manifest.csv", tmp_path / "crops", max_views=2)
    recipe = json.loads((tmp_path / "crops" / "crop.json").read_text())
    assert recipe["fixed_boxes"] is None and recipe["detect"] == {"max_views": 2}

    run = run_cv(tiny_config(cropped, tmp_path / "runs", "trainer.max_epochs=1", "data.num_folds=2", "data.augment.markers_p=0"))
    fold = run / "runs" / "fold0-seed0"
    assert json.loads((fold / "config.json").read_text())["input"]["crop"] == recipe

    # The uncropped screenshots, cut by the model's recipe, give each view the fold's own test prediction.
    run_predict(fold, tmp_path / "shots" / "manifest.csv", tmp_path / "auto.csv", progress=False)
    auto = pd.read_csv(tmp_path / "auto.csv").set_index("sample_id")
    own = pd.read_csv(fold / "predictions.csv").set_index("sample_id")
    training = pd.read_csv(cropped).set_index("sample_id")
    assert sorted(auto.index) == sorted(training.index)  # <source>#view<k>, as tus data crop names them
    assert (auto.loc[training.index, "box"] == training["box"]).all()
    probability = own.columns[own.columns.str.startswith("prob")][-1]
    np.testing.assert_allclose(auto.loc[own.index, "prob_inhomogeneous"], own[probability], atol=predict_atol(fold))

    # --crop none takes the screenshots whole: one row each, other numbers.
    run_predict(fold, tmp_path / "shots" / "manifest.csv", tmp_path / "none.csv", progress=False, crop="none")
    assert len(pd.read_csv(tmp_path / "none.csv")) == 8


@pytest.mark.parametrize(("choice", "frames"), [("middle", [2]), ("first", [0]), ("all", [0, 1, 2, 3, 4]), ("3", [3])])
def test_a_folder_of_dicoms_gives_the_frames_the_model_was_trained_on(tmp_path: Path, choice: str, frames: list[int]):
    pytest.importorskip("pydicom")
    cine = np.stack([np.full((16, 16), 10 * k, np.uint8) for k in range(5)])
    write_dicom(tmp_path / "loop.dcm", cine, patient_id="P1")
    write_dicom(tmp_path / "still.dcm", cine[0], patient_id="P2")
    write_grayscale(tmp_path / "plain.png", cine[1])
    table = read_inputs(tmp_path, choice)
    expected = [f"loop.dcm#frame{k}" for k in frames] + ["plain.png", "still.dcm"]
    assert table["sample_id"].tolist() == expected
    assert table["abs_path"].tolist() == [str((tmp_path / name).resolve()) for name in expected]
