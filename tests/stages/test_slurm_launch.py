"""A new 2-task run as ``srun`` starts it: the variables srun sets, and the rendezvous through which
rank 1 joins rank 0's run dir (keyed by job, step and restart). The two-process run itself is in
tests/stages/test_torchrun.py, next to the torchrun and Lightning launches it must equal."""

from __future__ import annotations

import os


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
