"""Diffusion training killed (SIGKILL) at a random step, or stopped by SIGTERM (at the end of
the epoch, exit 143, one line saying how to resume), and resumed with ``--resume`` ends
bit-identical to an uninterrupted run (EMA export, metrics.csv without duplicated steps)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.methods.test_iddpm import disk_manifest
from tests.reliability import faults
from tests.reliability.faults import interrupted_beside_twin, saved_step, stopped, tus_in_process


def overrides(manifest: Path, out: Path) -> list[str]:
    return [
        "--config",
        "diffusion/cpu",
        f"--data.sources=[{{manifest: '{manifest}'}}]",
        f"--output_root={out}",
        "--data.image_size=16",
        "--data.batch_size=4",
        "--data.steps_per_epoch=3",
        "--data.num_workers=0",
        "--data.cache_images=false",
        "--unet.sample_size=16",
        "--unet.base_channels=16",
        "--unet.channel_mults=[1, 2]",
        "--unet.attention_resolutions=[8]",
        "--unet.attention_head_dim=16",
        "--samples.every_n_steps=0",
        "--trainer.max_steps=30",
        "--trainer.precision=32-true",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        # The killed run and its uninterrupted twin start together: a memory format measured
        # by each under the other's load could differ, and the formats' results differ in the last bits.
        "--trainer.channels_last=false",
        "--logging.wandb=false",
        "--optim.lr=1e-3",
        "--ema.decay=0.9",
    ]


@pytest.mark.slow
def test_killed_and_terminated_diffusion_resumes_to_the_uninterrupted_run(tmp_path: Path):
    manifest = disk_manifest(tmp_path / "data")
    (killed, terminated), straight = interrupted_beside_twin("diffusion", lambda out: overrides(manifest, out), tmp_path, {signal.SIGKILL: 3, signal.SIGTERM: 4}, window_s=1.5)
    (reference,) = (straight / "export").iterdir()
    assert reference.name == "ema_unet_step0000030"

    # SIGKILL at a random step; resumed with --resume from the last checkpoint written.
    run_dir = killed.run_dir
    assert killed.process.returncode == -signal.SIGKILL
    assert not (run_dir / "export").exists()  # killed before the end-of-training export
    faults.leave_partial_write(run_dir, killed.process.pid)
    tus_in_process("diffusion", "--resume", str(run_dir))
    assert_same_run(run_dir, reference, straight)

    # SIGTERM: stopped at the end of an epoch (saved there) and resumed by the printed command.
    run_dir = terminated.run_dir
    match, resume = stopped(terminated.process, "diffusion", run_dir)
    step = saved_step(run_dir)
    assert step == int(match.group(2)) and step % 3 == 0 and 0 < step < 30  # data.steps_per_epoch=3
    assert not (run_dir / "export").exists()
    tus_in_process("diffusion", *resume)
    assert_same_run(run_dir, reference, straight)


def assert_same_run(run_dir: Path, reference: Path, straight: Path) -> None:
    (exported,) = (run_dir / "export").iterdir()
    assert exported.name == reference.name
    faults.assert_same_weights(exported / "diffusion_pytorch_model.safetensors", reference / "diffusion_pytorch_model.safetensors")
    faults.assert_no_duplicated_steps(run_dir / "metrics.csv")
    faults.assert_same_log(run_dir / "metrics.csv", straight / "metrics.csv")
    assert faults.partial_writes(run_dir) == []
