"""Fine-tuning CV killed mid-fold (SIGKILL) and resumed with ``--run-dir`` ends bit-identical to an
uninterrupted run: weights, predictions, metrics.csv and losses.csv (no duplicated steps)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import make_labeled_dataset
from tests.reliability.faults import (
    Killer,
    assert_no_duplicated_steps,
    assert_same_log,
    assert_same_weights,
    only_run_dir,
    start,
    tus_in_process,
)


def overrides(manifest: Path, out: Path) -> list[str]:
    return [
        "--config",
        "finetune/cpu",
        f"--data.manifest={manifest}",
        f"--output_root={out}",
        "--data.image_size=32",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--data.cache_images=false",
        "--trainer.max_epochs=6",
        # A resume checkpoint at every epoch end, so the kill lands after one.
        "--trainer.checkpoint_interval_s=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        # The killed run and its uninterrupted twin start together: a memory format measured
        # by each under the other's load could differ, and the formats' results differ in the last bits.
        "--trainer.channels_last=false",
        "--seeds=[0]",
        "--logging.wandb=false",
        "--data.augment.markers_p=0.5",
    ]


@pytest.mark.slow
def test_killed_fold_resumes_to_the_uninterrupted_result(tmp_path: Path):
    manifest = make_labeled_dataset(tmp_path / "data", patients=12)
    killed = start("finetune-cv", *overrides(manifest, tmp_path / "killed"))
    killer = Killer(killed, tmp_path / "killed", random.Random(11), window_s=1.0)
    tus_in_process("finetune-cv", *overrides(manifest, tmp_path / "straight"))
    killer.join()
    run_dir = only_run_dir(tmp_path / "killed")
    left = [p.parent.parent.name for p in run_dir.glob("runs/*/checkpoints/last.ckpt")]
    assert not (run_dir / "summary.json").exists()
    tus_in_process("finetune-cv", "--run-dir", str(run_dir))

    straight = only_run_dir(tmp_path / "straight")
    folds = sorted(p.name for p in (straight / "runs").iterdir())
    assert folds == ["fold0-seed0", "fold1-seed0", "fold2-seed0"] and set(left) <= set(folds)
    for fold in folds:
        a, b = run_dir / "runs" / fold, straight / "runs" / fold
        assert_same_weights(a / "model.safetensors", b / "model.safetensors")
        assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
        pd.testing.assert_frame_equal(pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv"), check_exact=True)
        assert_no_duplicated_steps(a / "metrics.csv")
        assert_same_log(a / "metrics.csv", b / "metrics.csv")
        assert_same_log(a / "losses.csv", b / "losses.csv")
        assert not list((a / "checkpoints").glob("*.ckpt"))  # finished runs drop their training state
    assert (run_dir / "folds.csv").read_text() == (straight / "folds.csv").read_text()
    assert not (run_dir / "run.lock").exists()
