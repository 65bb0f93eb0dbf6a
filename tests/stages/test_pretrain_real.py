"""A short CPU pretraining on real ultrasound: breast (BUSI) + thyroid (DDTI) with organ labels.

Skipped where ../shared/data is absent. 150 images per organ (40 of each held out for the
probe), 64 px, batch 16, 60 steps of ResNet-18. The organ loss is weighted 1.0 rather than
the paper's 0.2 so the organ head has learned something after so few steps; the loss
weighting itself is covered by tests/test_pretrain.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import tus.stages.pretrain
from tus.config import load_config
from tus.stages.pretrain import PretrainConfig, run_pretraining

REPO = Path(__file__).resolve().parents[2]
PER_ORGAN = 150
STEPS = 60


def organ_subset(shared_data: Path, name: str, out: Path) -> Path:
    """A manifest of PER_ORGAN random images of one set, pointing at the shared files."""
    frame = pd.read_csv(shared_data / name / "manifest.csv").sample(n=PER_ORGAN, random_state=0)
    frame["path"] = [str(shared_data / name / p) for p in frame["path"]]
    manifest = out / f"{name}.csv"
    frame[["path", "organ"]].to_csv(manifest, index=False)
    return manifest


@pytest.mark.slow
@pytest.mark.shared_data
def test_short_pretraining_on_breast_and_thyroid_learns_the_organ(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Nothing here reads the run's figures: their UMAP cost 33 s of numba compilation (the first
    # UMAP of a process), more than the training (tests/test_figures.py draws them).
    monkeypatch.setattr(tus.stages.pretrain, "write_pretrain_figures", lambda run_dir: [])
    sources = [organ_subset(shared_data, name, tmp_path) for name in ("busi", "ddti")]
    overrides = [
        "data.sources=[" + ", ".join(f"{{manifest: '{m}'}}" for m in sources) + "]",
        f"output_root={tmp_path / 'runs'}",
        "data.batch_size=16",
        "method.model.projection_hidden_dim=128",
        "method.loss.organ_weight=1.0",
        f"trainer.max_steps={STEPS}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        # What channels_last 'auto' chose here after timing 16 trial steps (7 s): 345 vs 385 ms a step.
        "trainer.channels_last=true",
        "method.schedule.warmup_steps=5",
        "checkpoint_every_n_steps=null",
        "monitor.every_n_steps=30",
        "monitor.holdout_per_organ=40",
        "monitor.bank_per_organ=110",
        "logging.wandb=false",
    ]
    run_dir = run_pretraining(load_config(PretrainConfig, REPO / "experiments/pretrain/cpu.yaml", overrides))

    pool = json.loads((run_dir / "pool.json").read_text())
    assert pool["images_per_organ"] == {"breast": 110, "thyroid": 110}
    assert pool["heldout_per_organ"] == {"breast": 40, "thyroid": 40}
    assert pool["draw_share_per_organ"] == {"breast": 0.5, "thyroid": 0.5}

    steps = pd.read_csv(run_dir / "metrics.csv").dropna(subset=["train/loss_con"])
    assert len(steps) == STEPS
    first, last = steps["train/loss_con"].iloc[:10].mean(), steps["train/loss_con"].iloc[-10:].mean()
    assert last < first - 0.2, (first, last)

    probe = json.loads((run_dir / "summary.json").read_text())["probe"]
    assert [p["step"] for p in probe] == [0, 30, 60]
    final = probe[-1]
    # Chance is 0.5 (balanced held-out slice). The untrained organ head sits at chance.
    assert probe[0]["probe/head_organ_acc"] <= 0.6
    assert final["probe/head_organ_acc"] >= 0.7, probe
    assert final["probe/knn_organ_acc"] >= 0.75, probe
    assert (run_dir / "encoder" / "model.safetensors").is_file()
