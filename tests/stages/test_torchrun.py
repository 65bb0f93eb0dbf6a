"""One pretraining config, three 2-process CPU launches: torchrun, Lightning's own DDP launcher,
and two processes started as ``srun`` starts them (SLURM's variables, no launcher; gloo).

All must run the same distributed job: same global batch, same per-rank data and view
streams, same all-reduced gradients, hence the same final losses and encoder weights; each
makes exactly one run dir (rank 1 joins rank 0's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import free_port
from tus.data.phantom import generate_phantom

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def pretrain_command(pool: Path, out: Path) -> list[str]:
    return [
        "-m",
        "tus.cli.main",
        "pretrain",
        "--config",
        str(REPO / "experiments" / "pretrain" / "cpu.yaml"),
        f"data.sources=[{{manifest: '{pool}'}}]",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.precision=32-true",
        f"trainer.max_steps={STEPS}",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "method.model.projection_hidden_dim=32",
        "method.model.projection_output_dim=16",
        "method.schedule.warmup_steps=1",
        "monitor.every_n_steps=0",
        "monitor.holdout_per_organ=0",
        "checkpoint_every_n_steps=null",
        f"output_root={out}",
    ]


def launch(arguments: list[str], tmp_path: Path) -> str:
    # torchrun --standalone binds its own rendezvous port; Lightning's launcher reads MASTER_PORT.
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, *arguments], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def finished_run(out: Path) -> Path:
    """The one run dir under ``out``: a 2-process run makes exactly one, and nothing else."""
    entries = list(out.iterdir())
    assert len(entries) == 1 and entries[0].is_dir(), f"expected exactly one run dir under {out}, found {entries}"
    assert (entries[0] / "summary.json").is_file()
    return entries[0]


@pytest.mark.slow
def test_torchrun_srun_and_lightning_ddp_launch_pretrain_identically(tmp_path):
    from tests.stages.test_slurm_launch import srun_env

    pool = generate_phantom(tmp_path / "phantom", num_patients=4, image_size=32, pool_size=32).unlabeled_manifest
    torchrun_out, lightning_out, slurm_out = tmp_path / "torchrun", tmp_path / "lightning", tmp_path / "slurm"
    logs = [
        launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *pretrain_command(pool, torchrun_out)], tmp_path),
        launch(pretrain_command(pool, lightning_out), tmp_path),
    ]
    assert all("Starting with 2 processes" in log for log in logs)
    # srun's two tasks, rank 1 started first: it must wait for rank 0's run dir, not make its own.
    port = free_port()
    tasks = [
        subprocess.Popen([sys.executable, *pretrain_command(pool, slurm_out)], cwd=tmp_path, env=srun_env(rank, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (1, 0)
    ]
    task_logs = [task.communicate(timeout=300)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], task_logs[0][-3000:] + task_logs[1][-3000:]
    assert "Starting with 2 processes" in task_logs[1]

    runs = [finished_run(out) for out in (torchrun_out, lightning_out, slurm_out)]
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    weights = [load_file(str(run / "encoder" / "model.safetensors")) for run in runs]
    for summary, weight in zip(summaries[1:], weights[1:]):
        assert summaries[0]["steps"] == summary["steps"] == STEPS
        assert summaries[0]["last"].keys() == summary["last"].keys() and "train/loss" in summary["last"]
        for name, value in summaries[0]["last"].items():
            assert value == pytest.approx(summary["last"][name], rel=1e-5, abs=1e-6), name
        assert weights[0].keys() == weight.keys()
        for name in weights[0]:
            torch.testing.assert_close(weights[0][name], weight[name], rtol=1e-5, atol=1e-6, msg=name)
