"""The benchmarks' own honesty (the plain CV baseline imports no framework; every timed tus run
starts from an empty cache) and benchmarks/real_data.py end to end at toy size on the shared
BUSI + DDTI images (skips without them): the table's arms, the recipe-variant bookkeeping and
the per-fold leakage guard of the pretraining pool."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tus.data.cache import CACHE_DIR_ENV, cache_root

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark_script(name: str, module_name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_plain_cv_baseline_imports_no_framework():
    # cv_wall.py charges tus for importing Lightning; the plain script it is compared with
    # must not pay that too (it once did, through common.py and FineTuneModule: ~1 s).
    code = f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import plain_cv; print(' '.join(sys.modules))"
    modules = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())
    assert "timm" in modules and "torch" in modules
    assert not {name for name in modules if name.split(".")[0] in {"lightning", "pytorch_lightning", "torchmetrics"}}
    assert not {name for name in modules if name.startswith(("tus.methods", "tus.runs", "tus.stages", "tus.callbacks"))}


def test_scratch_cache_gives_tus_an_empty_cache_and_restores_the_users(tmp_path: Path, monkeypatch):
    common = load_benchmark_script("common", "benchmark_common")
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "user-cache"))
    with common.scratch_cache() as root:
        assert cache_root() == root / "cache"
        assert list(root.iterdir()) == []
        with common.phantom_workspace(patients=4, image_size=32) as (inner, paths):
            assert cache_root() == inner / "cache" and paths.labeled_manifest.is_file()
        assert cache_root() == root / "cache"
    assert not root.exists()
    assert os.environ[CACHE_DIR_ENV] == str(tmp_path / "user-cache")
    monkeypatch.delenv(CACHE_DIR_ENV)
    with common.scratch_cache():
        assert CACHE_DIR_ENV in os.environ
    assert CACHE_DIR_ENV not in os.environ


@pytest.mark.slow
def test_real_data_variant_rows_and_per_fold_pool_exclusion(shared_data: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    script = load_benchmark_script("real_data", "real_data_benchmark")
    out = tmp_path / "out"
    # 2 folds, the pretrained arm only (the scratch arm's CV: the three-class test below) and no
    # organ probe (its UMAP figure alone took ~50 s of this test's ~390 s). One torch thread
    # (the script's default is 2: two xdist workers on 2 cores then spin against each other) and
    # no channels_last 'auto' timing (16 trial steps per pretraining and fold, 61 s of 205 s).
    common = ["--data-root", str(shared_data), "--out", str(out), "--epochs", "1", "--image-size", "32", "--seeds", "0", "--pretrain-steps", "4", "--folds", "2", "--threads", "1"]
    pretrain_set = ["method.schedule.warmup_steps=1", "monitor.every_n_steps=0", "trainer.channels_last=false"]
    finetune_set = ["optim.backbone_lr_scale=0.5", "trainer.channels_last=false"]
    common += [f"--pretrain-set={setting}" for setting in pretrain_set]
    script.main([*common, "--arms", "d", "--variant", "low", *(f"--finetune-set={setting}" for setting in finetune_set)])

    table = pd.read_csv(out / "table.csv")
    assert table["arm"].tolist() == ["simclr-low"]
    assert table["runs"].tolist() == [2]
    recipes = json.loads((out / "recipes.json").read_text())
    assert recipes["simclr-low"] == {"pretrain_steps": 4, "pretrain_set": pretrain_set, "finetune_set": finetune_set}
    # A fine-tuning-only variant names its pretrainings by the pretraining recipe, so another
    # fine-tuning variant reuses them.
    prefix = script.pretraining_label(argparse.Namespace(pretrain_steps=4, pretrain_set=pretrain_set), "simclr")
    assert prefix.startswith("simclr-s4-") and prefix != "simclr-s4"
    assert sorted(p.name for p in (out / "pretrain").iterdir()) == [f"{prefix}-fold{fold}" for fold in range(2)]

    folds = pd.read_csv(out / "folds.csv")
    for fold in range(2):
        pool = json.loads((out / "pretrain" / f"{prefix}-fold{fold}" / "pool.json").read_text())
        excluded = {row["pool_path"] for row in pool["excluded_labeled"]["excluded"]}
        # Every test-fold image leaves the pool; so do its near duplicates (BUSI holds frames of
        # one scan as separate images), which may belong to other folds' rows.
        test_fold = set(folds.loc[folds["fold"] == fold, "path"])
        assert test_fold <= excluded
        assert {row["fold"] for row in pool["excluded_labeled"]["excluded"]} == {fold}


@pytest.mark.slow
def test_real_data_three_busi_classes_through_the_cv(shared_data: Path, tmp_path: Path, monkeypatch):
    from sklearn.metrics import f1_score

    monkeypatch.setenv("WANDB_MODE", "disabled")
    script = load_benchmark_script("real_data", "real_data_benchmark")
    out = tmp_path / "out"
    # One torch thread and no channels_last timing trials, as above.
    script.main(
        [
            "--data-root",
            str(shared_data),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--seeds",
            "0",
            "--arms",
            "b",
            "--classes",
            "3",
            "--threads",
            "1",
            "--scratch-set=trainer.channels_last=false",
        ]
    )
    table = pd.read_csv(out / "table.csv")
    assert table["arm"].tolist() == ["scratch"] and {"f1", "auroc", "balanced_accuracy"} <= set(table.columns)
    summary = json.loads((out / "arms" / "scratch" / "summary.json").read_text())
    assert summary["label_names"] == ["benign", "malignant", "normal"] and summary["runs"] == 3
    folds = pd.read_csv(out / "arms" / "scratch" / "folds.csv")
    assert all(set(folds.loc[folds["fold"] == fold, "label"]) == {0, 1, 2} for fold in range(3))
    predictions = pd.read_csv(out / "arms" / "scratch" / "runs" / "fold0-seed0" / "predictions.csv")
    recorded = json.loads((out / "arms" / "scratch" / "runs" / "fold0-seed0" / "metrics.json").read_text())
    assert recorded["f1"] == pytest.approx(f1_score(predictions["label"], predictions["prediction"], average="macro", zero_division=0))
    with pytest.raises(SystemExit, match="the plain arm .* is binary-only"):
        script.main(["--data-root", str(shared_data), "--out", str(tmp_path / "other"), "--arms", "a", "--classes", "3"])
