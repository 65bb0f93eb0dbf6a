"""tus predict and tus export on a finished tiny CV run (thresholds, calibration, refit, model card, bad inputs)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import make_labeled_dataset, predict_atol
from tests.stages.test_finetune_cv import tiny_config
from tus.cli.main import main as tus_main
from tus.data.images import write_grayscale
from tus.data.manifest import load_manifest
from tus.methods.classifier import FineTuneModule, load_finetuned, save_finetuned
from tus.models.backbones import BackboneConfig
from tus.stages.finetune_cv import finish_models, run_cv
from tus.stages.predict import run_predict

PROB = "prob_inhomogeneous"


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory) -> Path:
    """3 folds x 1 seed, 1 epoch, Youden threshold and temperature calibration."""
    root = tmp_path_factory.mktemp("cv")
    manifest = make_labeled_dataset(root / "data", patients=12, per_patient=2)
    config = tiny_config(manifest, root / "runs", "trainer.max_epochs=1", "threshold=youden", "calibration=temperature", "data.augment.markers_p=0")
    return run_cv(config)


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def test_fold_model_reproduces_its_own_test_predictions(cv_run: Path, tmp_path: Path):
    folds = pd.read_csv(cv_run / "folds.csv", dtype={"sample_id": str})
    data_manifest = Path(cv_run).parents[1] / "data" / "manifest.csv"
    for fold in range(3):
        model = cv_run / "runs" / f"fold{fold}-seed0"
        out = tmp_path / f"fold{fold}.csv"
        run_predict(model, data_manifest, out, progress=False)
        predicted = pd.read_csv(out, dtype={"sample_id": str}).set_index("sample_id")
        own = pd.read_csv(model / "predictions.csv", dtype={"sample_id": str}).set_index("sample_id")
        assert set(own.index) == set(folds.loc[folds["fold"] == fold, "sample_id"])
        # The model's recorded temperature applies to predict's output: sigmoid(logit(p) / T) of the raw CV probability.
        temperature = json.loads((model / "config.json").read_text())["decision"]["temperature"]
        expected = 1 / (1 + np.exp(-_logit(own["probability"]) / temperature))
        np.testing.assert_allclose(predicted.loc[own.index, PROB].to_numpy(), expected, atol=predict_atol(model))


def test_ensemble_is_the_mean_of_its_fold_models(cv_run: Path, tmp_path: Path):
    images = Path(cv_run).parents[1] / "data" / "images"
    run_predict(cv_run, images, tmp_path / "ensemble.csv", progress=False)
    ensemble = pd.read_csv(tmp_path / "ensemble.csv")
    per_fold = []
    for fold in range(3):
        run_predict(cv_run / "runs" / f"fold{fold}-seed0", images, tmp_path / f"f{fold}.csv", progress=False)
        per_fold.append(pd.read_csv(tmp_path / f"f{fold}.csv")[PROB].to_numpy())
    stacked = np.stack(per_fold)
    np.testing.assert_allclose(ensemble[PROB], stacked.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(ensemble["spread"], stacked.std(axis=0), atol=1e-6)
    np.testing.assert_allclose(ensemble["prob_homogeneous"] + ensemble[PROB], 1.0, atol=1e-6)
    threshold = json.loads((cv_run / "decision.json").read_text())["all_seeds"]["threshold"]
    assert (ensemble["prediction"] == np.where(ensemble[PROB] >= threshold, "inhomogeneous", "homogeneous")).all()
    assert len(ensemble) == 24 and list(ensemble.columns[:2]) == ["sample_id", "path"]


def test_fold_thresholds_come_from_the_other_folds_predictions_files(cv_run: Path):
    """Recomputed here from the predictions.csv files: Youden on the other folds' raw probabilities, then moved
    through the fold's temperature."""
    from tests.eval.test_thresholds_calibration import brute_force_youden

    tables = {f: pd.read_csv(cv_run / "runs" / f"fold{f}-seed0" / "predictions.csv") for f in range(3)}
    summary = json.loads((cv_run / "summary.json").read_text())
    for fold in range(3):
        others = pd.concat([tables[f] for f in range(3) if f != fold])
        raw = brute_force_youden(others["label"].tolist(), others["probability"].tolist())
        decision = json.loads((cv_run / "runs" / f"fold{fold}-seed0" / "config.json").read_text())["decision"]
        assert decision["threshold"] == pytest.approx(1 / (1 + np.exp(-_logit(raw) / decision["temperature"])), abs=1e-9)
        assert summary["decision"]["thresholds"][f"fold{fold}-seed0"] == pytest.approx(decision["threshold"])
    assert {"before", "after"} == set(summary["decision"]["ece"]) and "at threshold (youden)" in (cv_run / "summary.md").read_text()
    # Backward compatible: the CV's own predictions keep their columns.
    assert list(tables[0].columns) == ["sample_id", "label", "probability", "prediction"]


def test_labelled_manifest_gets_metrics_and_cis(cv_run: Path, tmp_path: Path):
    manifest = Path(cv_run).parents[1] / "data" / "manifest.csv"
    out = tmp_path / "preds.csv"
    result = run_predict(cv_run, manifest, out, progress=False)
    table = pd.read_csv(out)
    labelled = result["labelled"]
    predicted = (table[PROB] >= result["threshold"]).astype(int)
    assert labelled["metrics"]["accuracy"] == pytest.approx((predicted == table["label"]).mean())
    assert labelled["ci"]["accuracy"]["low"] <= labelled["metrics"]["accuracy"] <= labelled["ci"]["accuracy"]["high"]
    assert (tmp_path / "preds.metrics.json").is_file() and "95% CI" in (tmp_path / "preds.summary.md").read_text()


def test_refit_trains_on_every_labelled_image_once_per_seed(tmp_path: Path, monkeypatch):
    from tus.data import datamodules

    manifest = make_labeled_dataset(tmp_path / "data", patients=9, per_patient=2)
    config = tiny_config(manifest, tmp_path / "runs", "trainer.max_epochs=1", "refit=true", "seeds=[0,1]")
    frame = load_manifest(manifest, num_folds=3)
    trained: list[list[str]] = []
    original = datamodules.LabeledDataModule.setup

    def spy(self, stage=None):
        original(self, stage)
        if self.test_fold is None:
            trained.append(sorted(self.train_set.sample_ids))

    monkeypatch.setattr(datamodules.LabeledDataModule, "setup", spy)
    run_dir = tmp_path / "cv"
    (run_dir / "runs").mkdir(parents=True)
    finish_models(config, frame, run_dir)
    everything = sorted(frame["sample_id"].astype(str))
    assert trained == [everything, everything]
    for seed in (0, 1):
        record = json.loads((run_dir / "runs" / f"refit-seed{seed}" / "refit.json").read_text())
        assert record["evaluated"] is False and record["images"] == 18 and record["epochs"] == 1
        assert not (run_dir / "runs" / f"refit-seed{seed}" / "metrics.json").exists()  # never counted as a CV run
        assert load_finetuned(run_dir / "runs" / f"refit-seed{seed}").head.out_features == 2
        assert json.loads((run_dir / "runs" / f"refit-seed{seed}" / "config.json").read_text())["refit"]["evaluated"] is False


# --- export ---------------------------------------------------------------------------------------


def _small_model(kind: str, folder: Path, size: int = 32) -> Path:
    torch.manual_seed(0)
    if kind == "vit":
        backbone = BackboneConfig(name="vit_tiny_patch16_224", init="scratch", img_size=size, patch_size=8, global_pool="avg")
    else:
        backbone = BackboneConfig(name="resnet18", init="scratch")
    module = FineTuneModule(backbone, {})
    # Untrained heads give probabilities near 0.5; scale the head so the outputs differ visibly.
    with torch.no_grad():
        module.head.weight.mul_(20)
    return save_finetuned(module.eval(), folder / "model", image_size=size)


@pytest.mark.parametrize("kind", ["resnet", "vit"])
def test_onnx_and_torchscript_equal_pytorch_at_batch_1_and_7(kind: str, tmp_path: Path):
    import onnxruntime

    folder = _small_model(kind, tmp_path / kind)
    module = load_finetuned(folder)
    for fmt in ("onnx", "torchscript"):
        assert tus_main(["export", str(folder), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        for batch in (1, 7):
            x = torch.randn(batch, 1, 32, 32)
            with torch.no_grad():
                expected = module(x).softmax(1).numpy()
            if fmt == "onnx":
                session = onnxruntime.InferenceSession(str(tmp_path / fmt / "model.onnx"), providers=["CPUExecutionProvider"])
                got = session.run(["probabilities"], {"image": x.numpy()})[0]
            else:
                got = torch.jit.load(str(tmp_path / fmt / "model.pt")).eval()(x).detach().numpy()
            np.testing.assert_allclose(got, expected, atol=1e-4)


PLAIN_SCRIPT = textwrap.dedent(
    """
    # Follows preprocess.json with numpy + PIL + onnxruntime only (no tus): what a colleague's code would do.
    import json, sys
    import numpy as np
    import onnxruntime
    from PIL import Image, ImageOps

    folder, images = sys.argv[1], sys.argv[2:]
    spec = json.load(open(f"{folder}/preprocess.json"))
    size = spec["resize"]["height"]
    batch = []
    for path in images:
        grey = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("L"), dtype=np.float64)
        factor = grey.shape[0] // size  # the test's images are an integer multiple: area = block mean
        blocks = grey.reshape(size, factor, size, factor).mean(axis=(1, 3))
        pixels = np.floor(blocks + 0.5)  # rounded half up to uint8
        x = (pixels * spec["scale"] - spec["mean"][0]) / spec["std"][0]
        batch.append(np.repeat(x[None], spec["input"]["shape"][1], axis=0))
    session = onnxruntime.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
    probs = session.run([spec["output"]["name"]], {spec["input"]["name"]: np.stack(batch).astype(np.float32)})[0]
    print(json.dumps(probs.tolist()))
    """
)


def test_preprocess_json_followed_without_tus_reproduces_predict(cv_run: Path, tmp_path: Path):
    rng = np.random.default_rng(5)
    images = tmp_path / "new"
    for i in range(5):
        image = rng.integers(30, 120, (64, 64), dtype=np.uint8)
        if i % 2:
            image[16:32, 16:32] = 230
        write_grayscale(images / f"img{i}.png", image)
    run_predict(cv_run, images, tmp_path / "preds.csv", progress=False)
    predicted = pd.read_csv(tmp_path / "preds.csv")
    assert tus_main(["export", str(cv_run), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "onnx"), *map(str, predicted["path"])], capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    probs = np.array(json.loads(done.stdout))
    np.testing.assert_allclose(probs[:, 1], predicted[PROB], atol=1e-4)


def test_model_card_numbers_equal_the_cv_summary(cv_run: Path, tmp_path: Path):
    # tus explain's result beside the run (as in the demo) goes into the known limits; another run's would not.
    explain = Path(cv_run).parent / "explain"
    explain.mkdir(exist_ok=True)
    (explain / "marker_sensitivity.json").write_text(json.dumps({"prediction_change_rate": 0.125, "checkpoint": str((cv_run / "runs" / "fold0-seed0").resolve())}))
    assert tus_main(["export", str(cv_run / "runs" / "fold1-seed0"), "--format", "torchscript", "--out", str(tmp_path / "card")]) == 0
    summary = json.loads((cv_run / "summary.json").read_text())
    config = json.loads((tmp_path / "card" / "config.json").read_text())
    card = config["model_card"]
    assert card["evaluation"]["metrics"] == summary["metrics"] and card["evaluation"]["ci"] == summary["ci"]
    assert card["evaluation"]["at_threshold"] == summary["decision"]
    assert any("changed 12.5% of predictions" in limit for limit in card["known_limits"])
    assert card["training_data"]["images"] == 24 and card["training_data"]["patients"] == 12
    assert card["training_data"]["class_balance"] == {"homogeneous": 16, "inhomogeneous": 8}
    assert card["decision"]["threshold"] == config["threshold"] == summary["decision"]["thresholds"]["fold1-seed0"]
    text = (tmp_path / "card" / "MODEL_CARD.md").read_text()
    assert f"{summary['metrics']['accuracy']['mean'] * 100:.1f}" in text and "Intended use" in text
    preprocess = json.loads((tmp_path / "card" / "preprocess.json").read_text())
    assert preprocess["mean"] == [0.5] and preprocess["std"] == [0.25] and preprocess["input"]["layout"] == "NCHW"


# --- bad input ------------------------------------------------------------------------------------


def _fails_in_one_line(argv: list[str], capsys, *words: str) -> None:
    assert tus_main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_bad_inputs_fail_in_one_line_and_write_nothing(cv_run: Path, tmp_path: Path, capsys):
    from tus.models.export import save_export

    images = Path(cv_run).parents[1] / "data" / "images"
    out = tmp_path / "preds.csv"
    # A model folder from another tus version.
    other = tmp_path / "other"
    fold = cv_run / "runs" / "fold0-seed0"
    other.mkdir()
    (other / "model.safetensors").write_bytes((fold / "model.safetensors").read_bytes())
    (other / "config.json").write_text(json.dumps({**json.loads((fold / "config.json").read_text()), "tus_version": "9.0.0"}))
    _fails_in_one_line(["predict", "--model", str(other), "--images", str(images), "--out", str(out), "--no-progress"], capsys, str(other), "9.0.0")
    # A pretraining encoder, not a classifier.
    encoder = save_export(tmp_path / "encoder", "encoder", torch.nn.Linear(2, 2), {"architecture": {"library": "timm", "name": "resnet18", "kwargs": {}}, "in_chans": 1})
    _fails_in_one_line(["predict", "--model", str(encoder), "--images", str(images), "--out", str(out), "--no-progress"], capsys, "encoder", "not a fine-tuned classifier")
    # An image folder without images.
    (tmp_path / "empty").mkdir()
    _fails_in_one_line(["predict", "--model", str(cv_run), "--images", str(tmp_path / "empty"), "--out", str(out), "--no-progress"], capsys, "no images")
    # An unreadable image among good ones.
    broken = tmp_path / "broken"
    broken.mkdir()
    for source in sorted(images.iterdir())[:3]:
        (broken / source.name).write_bytes(source.read_bytes())
    (broken / "zz_bad.png").write_bytes(b"not a png at all")
    _fails_in_one_line(["predict", "--model", str(cv_run), "--images", str(broken), "--out", str(out), "--no-progress"], capsys, "zz_bad.png")
    assert not out.exists() and not list(tmp_path.glob("preds*"))
    # export: an occupied --out is refused, and nothing is left behind by a refused export
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    _fails_in_one_line(["export", str(cv_run), "--format", "onnx", "--out", str(tmp_path / "busy")], capsys, "--out")
    _fails_in_one_line(["export", str(encoder), "--format", "onnx", "--out", str(tmp_path / "enc-out")], capsys, "encoder")
    assert not (tmp_path / "enc-out").exists() and not list(tmp_path.glob(".enc-out*"))
