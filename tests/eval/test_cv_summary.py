"""summary.json/summary.md of a CV run: the paper's spread, the sample std, patient-bootstrap CIs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from tus.eval.cv_summary import collect_runs, pooled_predictions, write_summary

# 2 seeds x 2 folds; 6 patients, 2 images each; fold 0 holds patients P0-P2, fold 1 P3-P5.
PATIENTS = [f"P{i // 2}" for i in range(12)]
LABELS = [1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1]
FOLD = [0] * 6 + [1] * 6


def fake_cv(root: Path) -> tuple[Path, pd.DataFrame]:
    frame = pd.DataFrame({"sample_id": [f"s{i:02d}" for i in range(12)], "patient_id": PATIENTS, "label": LABELS, "path": "x.png"})
    rng = np.random.default_rng(3)
    for seed in (0, 1):
        for fold in (0, 1):
            rows = frame[np.array(FOLD) == fold]
            prob = np.clip(rows["label"].to_numpy() * 0.6 + rng.uniform(0, 0.5, len(rows)), 0, 1)
            pred = (prob >= 0.5).astype(int)
            run = root / "runs" / f"fold{fold}-seed{seed}"
            run.mkdir(parents=True)
            pd.DataFrame({"sample_id": rows["sample_id"], "label": rows["label"], "probability": prob, "prediction": pred}).to_csv(run / "predictions.csv", index=False)
            label = rows["label"].to_numpy()
            tp, fp, fn = int(((pred == 1) & (label == 1)).sum()), int(((pred == 1) & (label == 0)).sum()), int(((pred == 0) & (label == 1)).sum())
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn)
            metrics = {
                "fold": fold,
                "seed": seed,
                "accuracy": float((pred == label).mean()),
                "precision": precision,
                "recall": recall,
                "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                "auroc": 0.5 + 0.1 * seed + 0.05 * fold,
            }
            (run / "metrics.json").write_text(json.dumps(metrics))
    return root, frame


def config() -> SimpleNamespace:
    return SimpleNamespace(name="cv", seeds=[0, 1], data=SimpleNamespace(num_folds=2), selection="last")


def test_summary_has_both_spreads_and_patient_bootstrap_cis(tmp_path):
    run_dir, frame = fake_cv(tmp_path)
    runs = collect_runs(run_dir)
    summary = write_summary(run_dir, runs, frame, config(), n_boot=200)
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))

    # the existing keys: mean and sample std over all runs
    accuracy = runs["accuracy"].to_numpy()
    assert summary["metrics"]["accuracy"]["std"] == pytest.approx(np.std(accuracy, ddof=1))
    assert summary["runs"] == summary["expected_runs"] == 4
    # the paper's spread: accuracy over runs, F1 over the two seed means
    assert summary["spread"]["accuracy"]["std"] == pytest.approx(np.std(accuracy, ddof=1))
    assert summary["spread"]["accuracy"]["std_over"] == "runs"
    f1_seed_means = [runs.loc[runs["seed"] == s, "f1"].mean() for s in (0, 1)]
    assert summary["spread"]["f1"]["std"] == pytest.approx(np.std(f1_seed_means, ddof=1))
    assert summary["spread"]["f1"]["std_over"] == "seed_means"
    assert summary["spread"]["f1"]["sample_std"] == pytest.approx(np.std(runs["f1"], ddof=1))
    # auroc is 0.5, 0.55, 0.6, 0.65: seed means 0.525 and 0.625
    assert summary["spread"]["auroc"]["std"] == pytest.approx(np.std([0.525, 0.625], ddof=1))

    # CI by hand: draw patients (np.unique order) with default_rng(0), pool their rows, quantiles
    pooled = pooled_predictions(run_dir, frame)
    assert len(pooled) == 24 and set(pooled.columns) >= {"patient_id", "prob", "pred", "fold", "seed"}
    patients = np.unique(pooled["patient_id"])
    draws = np.random.default_rng(0).integers(0, len(patients), (200, len(patients)))
    values = []
    for draw in draws:
        rows = pd.concat([pooled[pooled["patient_id"] == patients[i]] for i in draw])
        values.append((rows["label"] == rows["pred"]).mean())
    low, high = np.quantile(values, [0.025, 0.975])
    assert summary["ci"]["accuracy"] == {"low": pytest.approx(low), "high": pytest.approx(high)}
    assert low <= (pooled["label"] == pooled["pred"]).mean() <= high

    markdown = (run_dir / "summary.md").read_text()
    assert "| *paper spread* |" in markdown and "| *95% CI, patients* |" in markdown
    assert "accuracy's std over all fold x seed runs, the other metrics' std over the per-seed means" in markdown
    assert "200 resamples of patients" in markdown and "pooled over 4 runs (6 patients)" in markdown
    assert f"[{100 * low:.1f}, {100 * high:.1f}]" in markdown


def test_one_seed_has_no_seed_mean_spread_and_no_predictions_no_ci(tmp_path):
    run_dir, frame = fake_cv(tmp_path)
    for path in run_dir.glob("runs/*-seed1"):
        for file in path.iterdir():
            file.unlink()
        path.rmdir()
    for path in run_dir.glob("runs/*/predictions.csv"):
        path.unlink()
    summary = write_summary(run_dir, collect_runs(run_dir), frame, SimpleNamespace(**{**vars(config()), "seeds": [0]}))
    assert summary["spread"]["f1"]["std"] is None and summary["ci"] == {}
    markdown = (run_dir / "summary.md").read_text()
    assert "± n/a" in markdown and "95% CI" not in markdown
