"""Fine-tuning CV stopped mid-fold, by SIGKILL and by SIGTERM (``scancel``, a preemption), and
resumed ends bit-identical to an uninterrupted run: weights, predictions, metrics.csv and
losses.csv (no duplicated steps). SIGTERM stops at the end of the current epoch, saves there,
exits 143 and prints the command that resumes; SIGKILL is resumed with ``--run-dir``. Temp files
of a checkpoint write cut by the kill are removed by the resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.helpers import make_labeled_dataset, tiny_cv_overrides
from tests.reliability import faults
from tests.reliability.faults import interrupted_beside_twin, stopped, tus_in_process


def overrides(manifest: Path, out: Path) -> list[str]:
    more = (
        # A resume checkpoint at every epoch end, so the kill lands after one.
        "--trainer.checkpoint_interval_s=0",
        "--trainer.log_every_n_steps=1",
        "--data.augment.markers_p=0.5",
        # Nothing here reads the CV figures, drawn by the twin and each resume (~3 s each).
        "--figures=false",
    )
    return tiny_cv_overrides(manifest, out, epochs=6, more=more)


def assert_same_cv(run_dir: Path, straight: Path) -> None:
    """Every fold of the resumed CV equals the uninterrupted one's, bit for bit, and the CV is finished."""
    folds = sorted(p.name for p in (straight / "runs").iterdir())
    assert folds == ["fold0-seed0", "fold1-seed0", "fold2-seed0"]
    for fold in folds:
        a, b = run_dir / "runs" / fold, straight / "runs" / fold
        faults.assert_same_weights(a / "model.safetensors", b / "model.safetensors")
        assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
        pd.testing.assert_frame_equal(pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv"), check_exact=True)
        faults.assert_no_duplicated_steps(a / "metrics.csv")
        faults.assert_same_log(a / "metrics.csv", b / "metrics.csv")
        faults.assert_same_log(a / "losses.csv", b / "losses.csv")
        assert not list((a / "checkpoints").glob("*.ckpt"))  # finished runs drop their training state
    assert (run_dir / "folds.csv").read_text() == (straight / "folds.csv").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["metrics"] == json.loads((straight / "summary.json").read_text())["metrics"]
    assert not (run_dir / "run.lock").exists() and faults.partial_writes(run_dir) == []


@pytest.mark.slow
def test_killed_and_terminated_folds_resume_to_the_uninterrupted_result(tmp_path: Path):
    manifest = make_labeled_dataset(tmp_path / "data", patients=12)
    # SIGTERM within 0.1 s of fold 0's first epoch end, so it lands in training (5 epochs to go,
    # ~1.4 s on a slow core): later, a fast machine may have finished the fold's training, and the
    # run then stops at once without saving (a path the SIGKILL half covers). CI failed so.
    windows = {signal.SIGKILL: 1.0, signal.SIGTERM: 0.1}
    (killed, terminated), straight = interrupted_beside_twin("finetune-cv", lambda out: overrides(manifest, out), tmp_path, {signal.SIGKILL: 11, signal.SIGTERM: 5}, windows)

    # SIGKILL: whatever the fold in progress left; a resume with --run-dir finishes the CV.
    run_dir = killed.run_dir
    assert killed.process.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()
    (in_progress, *_) = [p for p in sorted((straight / "runs").iterdir()) if not (run_dir / "runs" / p.name / "metrics.json").exists()]
    faults.leave_partial_write(run_dir / "runs" / in_progress.name, killed.process.pid)
    tus_in_process("finetune-cv", "--run-dir", str(run_dir))
    assert_same_cv(run_dir, straight)

    # SIGTERM: the fold in progress saved at the end of its epoch; the printed command resumes.
    run_dir = terminated.run_dir
    match, resume = stopped(terminated.process, "finetune-cv", run_dir)
    assert match.group(2) is not None  # the epoch ended within the grace: saved there
    (fold,) = [p.parent.parent for p in run_dir.glob("runs/*/checkpoints/last.ckpt") if not (p.parent.parent / "metrics.json").exists()]
    checkpoint = torch.load(fold / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == int(match.group(2))
    # Saved in the epoch's end hooks: the epoch is processed, not yet counted as completed.
    progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert progress["processed"] == progress["completed"] + 1 == checkpoint["epoch"] + 1
    assert not (run_dir / "summary.json").exists() and not (run_dir / "run.lock").exists()
    tus_in_process("finetune-cv", *resume)
    assert_same_cv(run_dir, straight)
