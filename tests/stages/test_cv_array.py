"""A CV split over processes as a SLURM job array runs it: ``--prepare`` makes the run dir, each
fold x seed run is a separate ``tus finetune-cv --run-dir RUN --task-index I`` (or ``--only``)
process, ``--join`` writes the summary. It must be the summary of a local ``tus finetune-cv`` run,
and a missing run must be named, not averaged over."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import make_labeled_dataset, tiny_cv_overrides
from tests.reliability.faults import _env, only_run_dir, tus_command, tus_in_process
from tus.cli.main import main
from tus.stages.finetune_cv import FineTuneCVConfig, cv_jobs


def overrides(manifest: Path, out: Path) -> list[str]:
    return tiny_cv_overrides(manifest, out, epochs=2)


@pytest.mark.slow
def test_job_array_cv_joins_into_the_local_runs_summary(tmp_path: Path, capsys):
    manifest = make_labeled_dataset(tmp_path / "data", patients=12)
    tus_in_process("finetune-cv", *overrides(manifest, tmp_path / "local"))
    local = only_run_dir(tmp_path / "local")

    assert main(["finetune-cv", "--prepare", *overrides(manifest, tmp_path / "array")]) == 0
    printed = capsys.readouterr().out
    run_dir = only_run_dir(tmp_path / "array")
    assert f"run dir: {run_dir}" in printed and "tasks: 3 (--task-index 0..2" in printed
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "folds.csv"]

    # Two tasks at once, each in its own process (as two array tasks on two GPUs): one a
    # subprocess, the other this process (one interpreter start less on a small machine).
    task = subprocess.Popen(tus_command("finetune-cv", "--run-dir", str(run_dir), "--task-index", "0"), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        tus_in_process("finetune-cv", "--run-dir", str(run_dir), "--task-index", "1")
    finally:
        output = task.communicate(timeout=600)[0]
    assert task.returncode == 0, output[-3000:]

    capsys.readouterr()
    assert main(["finetune-cv", "--join", str(run_dir)]) == 1
    (refused,) = capsys.readouterr().err.strip().splitlines()
    assert re.search(r"1 of 3 fold x seed runs have not finished \(fold2-seed0\)", refused)
    assert not (run_dir / "summary.json").exists() and not (run_dir / "runs.csv").exists()

    tus_in_process("finetune-cv", "--run-dir", str(run_dir), "--only", "fold=2,seed=0")
    assert main(["finetune-cv", "--join", str(run_dir)]) == 0

    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "runs.csv"), pd.read_csv(local / "runs.csv"), check_exact=True)
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads((local / "summary.json").read_text())
    assert (run_dir / "summary.md").read_text() == (local / "summary.md").read_text()
    assert (run_dir / "folds.csv").read_text() == (local / "folds.csv").read_text()


def test_task_indices_cover_every_fold_and_seed_once_and_bad_ones_are_refused(tmp_path: Path, capsys):
    config = FineTuneCVConfig(seeds=[3, 7])
    config.data.num_folds = 3
    jobs = cv_jobs(config)
    assert sorted(jobs) == sorted((f, s) for f in range(3) for s in (3, 7)) and len(set(jobs)) == 6
    manifest = make_labeled_dataset(tmp_path / "data", patients=12)
    assert main(["finetune-cv", "--prepare", *overrides(manifest, tmp_path / "array")]) == 0
    run_dir = only_run_dir(tmp_path / "array")
    capsys.readouterr()
    for args, expected in (
        (["--task-index", "3"], "--task-index 3: this CV has 3 fold x seed runs (0..2)"),
        (["--only", "fold=0,seed=5"], "fold=0,seed=5: not a run of this CV"),
        (["--only", "fold=0"], "--only 'fold=0': give fold=F,seed=S"),
    ):
        assert main(["finetune-cv", "--run-dir", str(run_dir), *args]) == 2
        assert expected in capsys.readouterr().err
    assert main(["finetune-cv", "--task-index", "0", *overrides(manifest, tmp_path / "x")]) == 2
    assert "give --run-dir RUN" in capsys.readouterr().err
