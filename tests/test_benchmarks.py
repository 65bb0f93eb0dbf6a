"""benchmarks/real_data.py end to end at toy size on the shared BUSI + DDTI images (skips without them):
the table's arms, the recipe-variant bookkeeping and the per-fold leakage guard of the pretraining pool."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_real_data_script():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("real_data_benchmark", BENCHMARKS / "real_data.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.mark.slow
def test_real_data_variant_rows_and_per_fold_pool_exclusion(shared_data: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    script = load_real_data_script()
    out = tmp_path / "out"
    common = ["--data-root", str(shared_data), "--out", str(out), "--epochs", "1", "--image-size", "32", "--seeds", "0", "--pretrain-steps", "4"]
    common += ["--pretrain-set", "method.schedule.warmup_steps=1"]
    script.main([*common, "--arms", "b,d", "--variant", "low", "--finetune-set", "optim.backbone_lr_scale=0.5"])

    table = pd.read_csv(out / "table.csv")
    assert table["arm"].tolist() == ["scratch", "simclr-low"]
    assert table["runs"].tolist() == [3, 3]
    recipes = json.loads((out / "recipes.json").read_text())
    assert recipes["simclr-low"] == {"pretrain_steps": 4, "pretrain_set": ["method.schedule.warmup_steps=1"], "finetune_set": ["optim.backbone_lr_scale=0.5"]}
    # A fine-tuning-only variant names its pretrainings by the pretraining recipe, so another
    # fine-tuning variant reuses them.
    prefix = script.pretraining_label(argparse.Namespace(pretrain_steps=4, pretrain_set=["method.schedule.warmup_steps=1"]), "simclr")
    assert prefix.startswith("simclr-s4-") and prefix != "simclr-s4"
    assert sorted(p.name for p in (out / "pretrain").iterdir()) == [f"{prefix}-fold{fold}" for fold in range(3)]

    folds = pd.read_csv(out / "folds.csv")
    for fold in range(3):
        pool = json.loads((out / "pretrain" / f"{prefix}-fold{fold}" / "pool.json").read_text())
        excluded = {row["pool_path"] for row in pool["excluded_labeled"]["excluded"]}
        assert excluded == set(folds.loc[folds["fold"] == fold, "path"])
        assert {row["fold"] for row in pool["excluded_labeled"]["excluded"]} == {fold}
