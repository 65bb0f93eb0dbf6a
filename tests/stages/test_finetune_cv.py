"""The folds x seeds runner: aggregation, baselines, resume, and tiny end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import make_labeled_dataset, ran_in_bf16
from tus.config import ConfigError, load_config
from tus.data.datamodules import LabeledDataModule
from tus.data.manifest import load_manifest
from tus.eval.cv_summary import aggregate, format_mean_std, trivial_baselines
from tus.methods.classifier import load_finetuned
from tus.stages.finetune_cv import FineTuneCVConfig, cv_folds, run_cv

CPU_CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "finetune" / "cpu.yaml"


def tiny_config(manifest: Path, out: Path, *overrides: str) -> FineTuneCVConfig:
    return load_config(
        FineTuneCVConfig,
        CPU_CONFIG,
        [
            f"data.manifest={manifest}",
            f"output_root={out}",
            "data.image_size=32",
            "data.batch_size=8",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
            "seeds=[0]",
            "logging.wandb=false",
            "model.name=resnet10t",
            # These tests check the pipeline, not the recipe: over 2 epochs one-cycle spends most
            # steps warming up, and extending a one-cycle run changes its schedule.
            "optim.schedule=constant",
            *overrides,
        ],
    )


def test_aggregate_mean_and_sample_std():
    runs = pd.DataFrame({"accuracy": [0.8, 0.9, 1.0], "f1": [0.5, 0.5, 0.5], "precision": [1, 1, 1], "recall": [0, 0.5, 1], "auroc": [0.7, 0.8, 0.9]})
    stats = aggregate(runs)
    assert stats["accuracy"]["mean"] == pytest.approx(0.9)
    assert stats["accuracy"]["std"] == pytest.approx(0.1)  # ddof=1
    assert stats["f1"]["std"] == 0.0 and stats["recall"]["n"] == 3
    assert format_mean_std(stats["accuracy"]) == "90.0 ± 10.0"


def test_trivial_baselines_for_twenty_percent_positives():
    base = trivial_baselines(0.2)
    assert base["always_negative"]["accuracy"] == pytest.approx(0.8)
    assert base["always_negative"]["f1"] == 0.0
    assert base["prior_random"]["accuracy"] == pytest.approx(0.68)
    assert base["prior_random"]["f1"] == pytest.approx(0.2)


def test_end_to_end_learns_planted_signal_and_writes_outputs(tmp_path: Path):
    manifest = make_labeled_dataset(tmp_path / "data", patients=24, per_patient=2, positive_every=3)
    config = tiny_config(manifest, tmp_path / "runs", "trainer.max_epochs=6", "optim.lr_backbone=3e-3", "optim.lr_head=3e-3", "data.augment.markers_p=0")
    run_dir = run_cv(config)
    runs = pd.read_csv(run_dir / "runs.csv")
    assert len(runs) == 3 and sorted(runs["fold"]) == [0, 1, 2]
    folds = pd.read_csv(run_dir / "folds.csv")
    assert (folds.groupby("patient_id")["fold"].nunique() == 1).all()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["runs"] == 3 and summary["selection"] == "last"
    assert summary["metrics"]["f1"]["mean"] > 0.6  # the random guesser's F1 is 0.33
    table = (run_dir / "summary.md").read_text()
    assert "| Accuracy | F1 | Precision | Recall | AUROC |" in table and "always negative" in table
    predictions = pd.read_csv(run_dir / "runs" / "fold0-seed0" / "predictions.csv")
    test_ids = set(folds.loc[folds["fold"] == 0, "sample_id"])
    assert set(predictions["sample_id"]) == test_ids
    # The exported model reproduces the predictions (which come from the test pass, not a
    # second pass): a fresh forward of the test fold's images, in the fold's own order.
    model = load_finetuned(run_dir / "runs" / "fold0-seed0" / "model.safetensors")
    assert not list((run_dir / "runs" / "fold0-seed0" / "checkpoints").glob("*.ckpt"))
    assert model.head.out_features == 2
    frame = load_manifest(manifest)
    datamodule = LabeledDataModule(config.data, frame, cv_folds(config, frame), 0, 0)
    datamodule.setup("test")
    # Under the run's precision (bf16 autocast where precision auto chose it), batch by batch.
    bf16 = ran_in_bf16(run_dir / "runs" / "fold0-seed0")
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = torch.cat([model.eval()(batch["image"]).float() for batch in datamodule.test_dataloader()])
        probability = logits.softmax(1)[:, 1].double().numpy()
    assert predictions["sample_id"].astype(str).tolist() == datamodule.test_set.frame["sample_id"].astype(str).tolist()
    np.testing.assert_allclose(predictions["probability"], probability, rtol=0, atol=1e-6)
    assert (predictions["prediction"] == (probability >= 0.5)).all()


def test_resume_skips_finished_runs_and_refuses_changed_config(tmp_path: Path, monkeypatch):
    manifest = make_labeled_dataset(tmp_path / "data", patients=12)
    config = tiny_config(manifest, tmp_path / "runs", "trainer.max_epochs=1", "figures=false")
    import tus.stages.finetune_cv as cv

    calls = []
    original = cv.run_single

    def fail_on_fold_one(config, frame, folds, fold, seed, run_dir, factory=None):
        calls.append((fold, seed))
        if fold == 1:
            raise KeyboardInterrupt("interrupted")
        return original(config, frame, folds, fold, seed, run_dir, factory)

    monkeypatch.setattr(cv, "run_single", fail_on_fold_one)
    with pytest.raises(KeyboardInterrupt):
        run_cv(config)
    run_dir = next((tmp_path / "runs").iterdir())
    finished = (run_dir / "runs" / "fold0-seed0" / "metrics.json").read_text()
    calls.clear()
    monkeypatch.setattr(cv, "run_single", original)
    monkeypatch.setattr(cv, "run_single", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    run_cv(config, run_dir)
    assert calls == [1, 2]  # fold 0 was skipped
    assert (run_dir / "runs" / "fold0-seed0" / "metrics.json").read_text() == finished
    assert len(pd.read_csv(run_dir / "runs.csv")) == 3
    # figures=false: no figures and no links to them; tus report draws them from the run's files.
    assert not (run_dir / "figures").exists() and "## Figures" not in (run_dir / "summary.md").read_text()
    from tus.cli.report import main as report_main

    assert report_main([str(run_dir), "--n-boot", "20"]) == 0
    assert (run_dir / "figures" / "roc.png").is_file() and "## Figures" in (run_dir / "summary.md").read_text()
    changed = tiny_config(manifest, tmp_path / "runs", "trainer.max_epochs=5", "figures=false")
    with pytest.raises(ConfigError, match=r"differs from the one this run was started with \(trainer.max_epochs\)"):
        run_cv(changed, run_dir)
    assert not (run_dir / "config_changes.yaml").exists()


def test_unfinished_run_resumes_from_last_checkpoint(tmp_path: Path):
    from tus.data.folds import assign_folds
    from tus.data.manifest import load_manifest
    from tus.stages.finetune_cv import run_single

    manifest = make_labeled_dataset(tmp_path / "data", patients=12)
    frame = load_manifest(manifest)
    folds = assign_folds(frame, 3, 0)
    # checkpoint_interval_s=0: the resume checkpoint is written at the first epoch end.
    short = tiny_config(manifest, tmp_path / "runs", "trainer.max_epochs=1", "trainer.checkpoint_interval_s=0")
    sub = tmp_path / "single"
    # Leave a checkpoint behind as an interrupted run would: fit only, no test/export.
    import lightning as L

    from tus.data.datamodules import LabeledDataModule
    from tus.methods.classifier import FineTuneModule
    from tus.runs import build_loggers, build_trainer

    L.seed_everything(0)
    loggers = build_loggers(sub, short.logging, name="interrupted", config={})
    trainer = build_trainer(short.trainer, sub, loggers=loggers, callbacks=[])
    trainer.fit(FineTuneModule(short.model, short.optim), datamodule=LabeledDataModule(short.data, frame, folds, 0, 0))
    assert (sub / "checkpoints" / "last.ckpt").is_file()
    longer = tiny_config(manifest, tmp_path / "runs", "trainer.max_epochs=3")
    run_single(longer, frame, folds, 0, 0, sub)
    record = json.loads((sub / "metrics.json").read_text())
    assert record["epochs"] == 3
    # The resumed run trained only the missing epochs 1 and 2, and kept epoch 0's log rows.
    logged = pd.read_csv(sub / "metrics.csv")
    epochs_trained = logged.dropna(subset=["train/loss_epoch"])["epoch"].astype(int).tolist()
    assert epochs_trained == [0, 1, 2]
    assert not (sub / "checkpoints" / "last.ckpt").exists()


def test_inner_validation_selection_never_uses_test_fold(tmp_path: Path):
    manifest = make_labeled_dataset(tmp_path / "data", patients=30, per_patient=1)
    config = tiny_config(manifest, tmp_path / "runs", "selection=inner_val", "data.inner_val_fraction=0.25")
    run_dir = run_cv(config)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["selection"] == "inner_val" and "inner" in summary["selection_note"]
    assert "inner, patient-grouped validation" in (run_dir / "summary.md").read_text()


def test_real_data_smoke_run_on_busi(shared_data: Path, tmp_path: Path):
    busi = pd.read_csv(shared_data / "busi" / "manifest.csv")
    subset = pd.concat([busi[busi["label"] == 1].head(30), busi[busi["label"] == 0].head(60)])
    subset["path"] = [str(shared_data / "busi" / p) for p in subset["path"]]
    subset["patient_id"] = subset["path"]  # BUSI gives no grouping: one image per patient
    manifest = tmp_path / "busi_subset.csv"
    subset.to_csv(manifest, index=False)
    run_dir = run_cv(tiny_config(manifest, tmp_path / "runs", "trainer.max_epochs=1"))
    runs = pd.read_csv(run_dir / "runs.csv")
    assert len(runs) == 3
    assert np.isfinite(runs[["accuracy", "auroc"]].to_numpy()).all()
    assert pd.read_csv(run_dir / "folds.csv")["sample_id"].nunique() == 90


def fine_tune_module(**optim):
    import torch

    from tus.methods.classifier import FineTuneModule, FineTuneOptimConfig
    from tus.models.backbones import BackboneConfig

    torch.manual_seed(0)
    return FineTuneModule(BackboneConfig(name="test_resnet", init="scratch"), FineTuneOptimConfig(**optim))


def learning_rates(module, total_steps: int, steps_per_epoch: float) -> list[list[float]]:
    """(backbone, head) learning rate at each optimiser step."""
    built = module.build_optimizers(total_steps, steps_per_epoch)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(total_steps):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return rates


def test_finetune_default_is_the_reference_constant_adamw():
    import torch

    optimizer = fine_tune_module().build_optimizers(20, 5)
    assert isinstance(optimizer, torch.optim.AdamW)  # no scheduler at all
    assert [g["lr"] for g in optimizer.param_groups] == [1e-5, 1e-4]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.01]
    scaled = fine_tune_module(lr_head=1e-3, backbone_lr_scale=0.1, weight_decay=1e-5).build_optimizers(20, 5)
    assert [g["lr"] for g in scaled.param_groups] == pytest.approx([1e-4, 1e-3])
    assert scaled.param_groups[0]["weight_decay"] == 1e-5


def test_finetune_cosine_with_warmup_epochs_by_hand():
    rates = learning_rates(fine_tune_module(lr_backbone=1e-4, lr_head=1e-3, schedule="cosine", warmup_epochs=1), 20, 5)
    for step, (backbone, head) in enumerate(rates):
        shape = (step + 1) / 5 if step < 5 else 0.5 * (1 + np.cos(np.pi * (step - 5) / 15))
        assert head == pytest.approx(1e-3 * shape) and backbone == pytest.approx(1e-4 * shape)


def test_finetune_constant_with_warmup_fraction_and_onecycle():
    rates = learning_rates(fine_tune_module(lr_head=1e-3, warmup_fraction=0.2), 20, 5)
    assert [r[1] for r in rates] == pytest.approx([1e-3 * (s + 1) / 4 if s < 4 else 1e-3 for s in range(20)])
    rates = learning_rates(fine_tune_module(lr_head=1e-3, schedule="onecycle", warmup_fraction=0.25), 20, 5)
    head = [r[1] for r in rates]
    # torch's one-cycle: from max/25 up to max at the end of the rising phase, then down
    assert head[0] == pytest.approx(1e-3 / 25) and int(np.argmax(head)) == 4 and head[4] == pytest.approx(1e-3)
    assert head[-1] < head[0] and all(a >= b for a, b in zip(head[4:], head[5:]))
    with pytest.raises(ValueError, match="not both"):
        fine_tune_module(warmup_epochs=1, warmup_fraction=0.1)
    with pytest.raises(ValueError, match="constant, cosine, onecycle"):
        fine_tune_module(schedule="poly")


@pytest.mark.slow
def test_folds_redrawn_per_seed_are_recorded_and_kept_on_resume(tmp_path: Path):
    """data.folds_per_seed (the reference code): each seed has its own patient-grouped split,
    written to folds.csv with a seed column; resuming with the other setting is refused."""
    manifest = make_labeled_dataset(tmp_path / "data", patients=18)
    config = tiny_config(manifest, tmp_path / "runs", "--data.folds_per_seed=true", "--seeds=[0, 1]", "--trainer.max_epochs=1", "--record_losses=false")
    run_dir = run_cv(config)
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"sample_id": str, "patient_id": str})
    assert sorted(folds["seed"].unique()) == [0, 1] and len(folds) == 2 * len(pd.read_csv(manifest))
    per_seed = {seed: rows.set_index("sample_id")["fold"] for seed, rows in folds.groupby("seed")}
    assert (per_seed[0] != per_seed[1].loc[per_seed[0].index]).any()  # the splits differ
    for _, rows in folds.groupby("seed"):
        assert rows.groupby("patient_id")["fold"].nunique().max() == 1  # still patient-grouped
    assert len(pd.read_csv(run_dir / "runs.csv")) == 2 * config.data.num_folds
    run_cv(config, run_dir)  # resuming a finished run with the same setting trains nothing
    with pytest.raises(ConfigError, match="data.folds_per_seed"):
        run_cv(tiny_config(manifest, tmp_path / "runs", "--seeds=[0, 1]", "--trainer.max_epochs=1", "--record_losses=false"), run_dir)


def test_prediction_table_of_no_images_has_the_columns_of_a_full_one():
    """An empty test pass still gives predictions.csv's columns (it once failed to reshape (0, K))."""
    from tus.stages.finetune_cv import prediction_frame

    binary = prediction_frame(["a"], np.array([1]), np.array([[0.25, 0.75]], dtype=np.float32))
    assert binary.to_dict("records") == [{"sample_id": "a", "label": 1, "probability": 0.75, "prediction": 1}]
    empty = prediction_frame([], np.zeros(0), np.zeros((0, 2)))
    assert list(empty.columns) == list(binary.columns) and len(empty) == 0
    three = prediction_frame([], np.zeros(0), np.zeros((0, 3)), ["x", "y", "z"])
    assert len(three) == 0 and {"sample_id", "label", "prediction"} < set(three.columns) and len(three.columns) == 6
