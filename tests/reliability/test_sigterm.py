"""SIGTERM (``scancel``, a preemption) to a running fine-tuning, pretraining and diffusion: exit 143,
one line saying how to resume, a checkpoint from which the printed command resumes to the result
of an uninterrupted run, bit for bit.

Each training stage is stopped where it resumes exactly: pretraining at the end of the current
step (a checkpoint is saved there), fine-tuning and diffusion at the end of the epoch.
"""

from __future__ import annotations

import json
import random
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import make_labeled_dataset
from tests.methods.test_iddpm import disk_manifest
from tests.reliability import test_diffusion_fault, test_finetune_fault, test_pretrain_fault
from tests.reliability.faults import Killer, assert_no_duplicated_steps, assert_same_log, assert_same_weights, only_run_dir, start, tus_in_process
from tests.stages.test_pretrain import make_pool


def stopped(process: subprocess.Popen, stage: str, run_dir: Path) -> tuple[re.Match, list[str]]:
    """Exit 143 and exactly one 'stopped by SIGTERM' line; the line's parts and its resume argv."""
    output = process.stdout.read()
    assert process.returncode == 128 + signal.SIGTERM == 143, output[-3000:]
    lines = [line for line in output.splitlines() if "stopped by" in line]
    assert len(lines) == 1, output[-3000:]
    match = re.fullmatch(rf"tus {stage}: stopped by SIGTERM \((checkpoint saved at step (\d+)|its last checkpoint \(if any\) is kept)\); resume with: (.+)", lines[0])
    assert match, lines[0]
    command = shlex.split(match.group(3))
    assert command == ["tus", stage, "--resume", str(run_dir.resolve())]
    assert "Traceback" not in output
    return match, command[2:]


def saved_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_sigterm_to_finetuning_stops_at_an_epoch_end_and_resumes_exactly(tmp_path: Path):
    manifest = make_labeled_dataset(tmp_path / "data", patients=12)
    killed = start("finetune-cv", *test_finetune_fault.overrides(manifest, tmp_path / "killed"))
    killer = Killer(killed, tmp_path / "killed", random.Random(5), window_s=1.0, signum=signal.SIGTERM)
    tus_in_process("finetune-cv", *test_finetune_fault.overrides(manifest, tmp_path / "straight"))
    killer.join()
    run_dir = only_run_dir(tmp_path / "killed")
    match, resume = stopped(killed, "finetune-cv", run_dir)
    assert match.group(2) is not None  # the epoch ended within the grace: saved there
    (fold,) = [p.parent.parent for p in run_dir.glob("runs/*/checkpoints/last.ckpt") if not (p.parent.parent / "metrics.json").exists()]
    checkpoint = torch.load(fold / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == int(match.group(2))
    # Saved in the epoch's end hooks: the epoch is processed, not yet counted as completed.
    progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]
    assert progress["processed"] == progress["completed"] + 1 == checkpoint["epoch"] + 1
    assert not (run_dir / "summary.json").exists() and not (run_dir / "run.lock").exists()
    tus_in_process("finetune-cv", *resume)

    straight = only_run_dir(tmp_path / "straight")
    for fold_dir in sorted((straight / "runs").iterdir()):
        a, b = run_dir / "runs" / fold_dir.name, fold_dir
        assert_same_weights(a / "model.safetensors", b / "model.safetensors")
        assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
        assert_no_duplicated_steps(a / "metrics.csv")
        assert_same_log(a / "metrics.csv", b / "metrics.csv")
        assert_same_log(a / "losses.csv", b / "losses.csv")
    assert json.loads((run_dir / "summary.json").read_text())["metrics"] == json.loads((straight / "summary.json").read_text())["metrics"]


@pytest.mark.slow
def test_sigterm_to_pretraining_saves_the_current_step_and_resumes_exactly(tmp_path: Path):
    manifest = make_pool(tmp_path / "pool")
    killed = start("pretrain", *test_pretrain_fault.overrides(manifest, tmp_path / "killed"))
    killer = Killer(killed, tmp_path / "killed", random.Random(9), window_s=1.0, signum=signal.SIGTERM)
    tus_in_process("pretrain", *test_pretrain_fault.overrides(manifest, tmp_path / "straight"))
    killer.join()
    run_dir, straight = only_run_dir(tmp_path / "killed"), only_run_dir(tmp_path / "straight")
    match, resume = stopped(killed, "pretrain", run_dir)
    step = saved_step(run_dir)
    assert step == int(match.group(2)) and 0 < step < test_pretrain_fault.STEPS
    assert not (run_dir / "encoder").exists() and not (run_dir / "summary.json").exists()
    tus_in_process("pretrain", *resume)

    assert_same_weights(run_dir / "encoder" / "model.safetensors", straight / "encoder" / "model.safetensors")
    assert_no_duplicated_steps(run_dir / "metrics.csv")
    assert_same_log(run_dir / "metrics.csv", straight / "metrics.csv")


@pytest.mark.slow
def test_sigterm_to_diffusion_stops_at_an_epoch_end_and_resumes_exactly(tmp_path: Path):
    manifest = disk_manifest(tmp_path / "data")
    killed = start("diffusion", *test_diffusion_fault.overrides(manifest, tmp_path / "killed"))
    killer = Killer(killed, tmp_path / "killed", random.Random(4), window_s=1.0, signum=signal.SIGTERM)
    tus_in_process("diffusion", *test_diffusion_fault.overrides(manifest, tmp_path / "straight"))
    killer.join()
    run_dir, straight = only_run_dir(tmp_path / "killed"), only_run_dir(tmp_path / "straight")
    match, resume = stopped(killed, "diffusion", run_dir)
    step = saved_step(run_dir)
    assert step == int(match.group(2)) and step % 3 == 0 and 0 < step < 30  # data.steps_per_epoch=3
    assert not (run_dir / "export").exists()
    tus_in_process("diffusion", *resume)

    (exported,) = (run_dir / "export").iterdir()
    (reference,) = (straight / "export").iterdir()
    assert_same_weights(exported / "diffusion_pytorch_model.safetensors", reference / "diffusion_pytorch_model.safetensors")
    assert_no_duplicated_steps(run_dir / "metrics.csv")
    assert_same_log(run_dir / "metrics.csv", straight / "metrics.csv")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_outside_training_exits_128_plus_signal_with_one_line(monkeypatch, capsys, tmp_path, signum):
    """Before any fit (data checks, planning): stop at once, exit 128 + signal, one line, no traceback;
    the handlers tus installed are gone afterwards. Outside SLURM nothing is requeued."""
    import os

    from tus.cli import main as cli

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    before = signal.getsignal(signum)
    monkeypatch.setitem(cli.STAGES, "pretrain", ("tests.reliability.test_sigterm:_signal_myself", ""))
    global _SIGNAL
    _SIGNAL = signum
    assert cli.main(["pretrain"]) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tus pretrain: stopped by {signal.Signals(signum).name} (stopped before training started); resume with: run the same command again (finished work is kept)"]
    assert signal.getsignal(signum) == before


_SIGNAL = signal.SIGTERM


def _signal_myself(argv: list[str]) -> int:
    import os
    import time

    os.kill(os.getpid(), _SIGNAL)
    time.sleep(5)  # the handler raises before this ends
    return 0
