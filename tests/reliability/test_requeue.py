"""SLURM's time-limit warning, sent by hand: the pretraining script docker/slurm_2xl40s.sbatch run by
bash with SLURM's variables, a fake ``srun`` (runs the command) and a fake ``scontrol`` (records its
arguments) on PATH. SIGUSR1 to the training task must save the current step, requeue the job and
fail it (138); the requeued job (same id, SLURM_RESTART_COUNT=1) must resume that run dir and
finish it, with no step logged twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.reliability import test_pretrain_fault
from tests.reliability.faults import POLL_S, REPO, STARTUP_TIMEOUT_S, _env, assert_no_duplicated_steps, checkpoint_written, only_run_dir
from tests.stages.test_pretrain import make_pool

FAKE_SRUN = """#!/bin/bash
while [[ "${1:-}" == --* ]]; do shift; done
echo $$ >> "$FAKE_SLURM_DIR/srun.pids"
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_SLURM_DIR/scontrol.args"
"""


def fake_slurm(tmp_path: Path, restart: int) -> dict[str, str]:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True, exist_ok=True)
    (venv / "activate").write_text("")  # the test's interpreter is the environment already
    env = {key: value for key, value in _env().items() if not key.startswith("SLURM_")}
    return {
        **env,
        # The job script runs `tus`: the test's own environment's entry point (make test calls
        # .venv/bin/python without putting .venv/bin on PATH).
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(tmp_path),
        "TUS_HOME": str(REPO),
        "TUS_VENV": str(tmp_path / "venv"),
        "CONFIG": "pretrain/cpu",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "tus-pretrain",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_CPUS_PER_TASK": "1",
        "SLURM_RESTART_COUNT": str(restart),
    }


def script_args(manifest: Path, out: Path) -> list[str]:
    args = test_pretrain_fault.overrides(manifest, out)
    args = args[2:]  # the script gives --config (CONFIG)
    return [*args, "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", f"--trainer.max_steps={STEPS}"]


STEPS = 30  # a checkpoint every 3 steps: the signal right after the first lands well before the end


@pytest.mark.slow
def test_sigusr1_saves_requeues_and_the_requeued_job_finishes_the_same_run(tmp_path: Path):
    manifest = make_pool(tmp_path / "pool")
    script = REPO / "docker" / "slurm_2xl40s.sbatch"
    runs = tmp_path / "runs"
    job = subprocess.Popen(["bash", str(script), *script_args(manifest, runs)], cwd=tmp_path, env=fake_slurm(tmp_path, 0), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not checkpoint_written(runs):
        assert job.poll() is None, job.communicate()[0][-4000:]
        assert time.monotonic() < deadline
        time.sleep(POLL_S)
    (task,) = (tmp_path / "srun.pids").read_text().split()
    os.kill(int(task), signal.SIGUSR1)  # what #SBATCH --signal=USR1@90 sends to the job step
    output = job.communicate(timeout=STARTUP_TIMEOUT_S)[0]
    assert job.returncode == 128 + signal.SIGUSR1 == 138, output[-4000:]

    run_dir = only_run_dir(runs)
    assert (tmp_path / "scontrol.args").read_text().split("\n")[0] == "requeue 4242"
    assert (tmp_path / ".tus-slurm" / "4242.run_dir").read_text().strip() == str(run_dir.resolve())
    (line,) = [line for line in output.splitlines() if "stopped by" in line]
    step = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert (
        line
        == f"tus pretrain: stopped by SIGUSR1 (checkpoint saved at step {step}); resume with: tus pretrain --resume {run_dir.resolve()}; requeued SLURM job 4242: it continues this run when it starts again"
    )
    assert 0 < step < STEPS and not (run_dir / "encoder").exists()

    # SLURM starts the requeued job: the same script, the same job id, with the same arguments.
    again = subprocess.run(["bash", str(script), *script_args(manifest, runs)], cwd=tmp_path, env=fake_slurm(tmp_path, 1), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert f"restart 1 of job 4242: resuming {run_dir.resolve()}" in again.stdout
    assert only_run_dir(runs) == run_dir
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    assert (run_dir / "encoder" / "model.safetensors").is_file()
    assert_no_duplicated_steps(run_dir / "metrics.csv")
    assert len((tmp_path / "scontrol.args").read_text().split("\n")) == 2  # one requeue, then nothing
