"""A new 2-task run as ``srun`` starts it: two CPU processes with SLURM's variables (no torchrun,
no Lightning launcher), gloo. Rank 1 must join rank 0's run dir (the rendezvous keyed by job,
step and restart), and the job must compute what Lightning's own 2-process launch computes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.stages.test_torchrun import STEPS, finished_run, launch, pretrain_command
from tus.data.phantom import generate_phantom


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def srun_env(rank: int, port: int, job_id: str = "424242") -> dict[str, str]:
    """What ``srun --ntasks=2`` on one node sets for task ``rank`` (the variables Lightning reads)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "TORCHELASTIC_")) and key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "TUS_RUN_DIR")}
    return {
        **env,
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "tus-pretrain",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODELIST": "localhost",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.mark.slow
def test_two_srun_tasks_make_one_run_dir_and_the_lightning_ddp_result(tmp_path):
    pool = generate_phantom(tmp_path / "phantom", num_patients=4, image_size=32, pool_size=32).unlabeled_manifest
    slurm_out, lightning_out = tmp_path / "slurm", tmp_path / "lightning"
    port = free_port()
    # Rank 1 first: it must wait for rank 0's run dir, not make its own.
    tasks = [
        subprocess.Popen([sys.executable, *pretrain_command(pool, slurm_out)], cwd=tmp_path, env=srun_env(rank, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (1, 0)
    ]
    logs = [task.communicate(timeout=300)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "Starting with 2 processes" in logs[1]
    launch(pretrain_command(pool, lightning_out), tmp_path)

    by_slurm, by_lightning = finished_run(slurm_out), finished_run(lightning_out)  # one run dir, no rendezvous file left
    summaries = [json.loads((run / "summary.json").read_text()) for run in (by_slurm, by_lightning)]
    assert summaries[0]["steps"] == summaries[1]["steps"] == STEPS
    for name, value in summaries[1]["last"].items():
        assert summaries[0]["last"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    weights = [load_file(str(run / "encoder" / "model.safetensors")) for run in (by_slurm, by_lightning)]
    for name in weights[1]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_rendezvous_is_keyed_by_slurm_job_step_and_restart(tmp_path, monkeypatch):
    from tus import runs

    for key in [k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_"))]:
        monkeypatch.delenv(key)
    assert runs._rendezvous_file(tmp_path, "pretrain") is None
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    first = runs._rendezvous_file(tmp_path, "pretrain")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued job keeps its id: a stale file must not be read
    assert first != runs._rendezvous_file(tmp_path, "pretrain") and "77" in first.name
    monkeypatch.setenv("TUS_RUN_DIR_FILE", str(tmp_path / "state" / "77.run_dir"))
    published = runs._publish_for_torchrun(tmp_path, "pretrain", tmp_path / "run")
    assert published is not None and published.read_text() == str(tmp_path / "run")
    assert (tmp_path / "state" / "77.run_dir").read_text().strip() == str((tmp_path / "run").resolve())
