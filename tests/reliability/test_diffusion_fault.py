"""Diffusion training killed (SIGKILL) at a random step and resumed with ``--resume`` ends
bit-identical to an uninterrupted run (EMA export, metrics.csv without duplicated steps)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.methods.test_iddpm import disk_manifest
from tests.reliability.faults import Killer, assert_no_duplicated_steps, assert_same_log, assert_same_weights, only_run_dir, start, tus_in_process


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
def test_killed_diffusion_resumes_to_the_uninterrupted_run(tmp_path: Path):
    manifest = disk_manifest(tmp_path / "data")
    killed = start("diffusion", *overrides(manifest, tmp_path / "killed"))
    killer = Killer(killed, tmp_path / "killed", random.Random(3), window_s=1.5)
    tus_in_process("diffusion", *overrides(manifest, tmp_path / "straight"))
    killer.join()
    run_dir, straight = only_run_dir(tmp_path / "killed"), only_run_dir(tmp_path / "straight")
    assert not (run_dir / "export").exists()  # killed before the end-of-training export
    tus_in_process("diffusion", "--resume", str(run_dir))

    (exported,) = (run_dir / "export").iterdir()
    (reference,) = (straight / "export").iterdir()
    assert exported.name == reference.name == "ema_unet_step0000030"
    assert_same_weights(exported / "diffusion_pytorch_model.safetensors", reference / "diffusion_pytorch_model.safetensors")
    assert_no_duplicated_steps(run_dir / "metrics.csv")
    assert_same_log(run_dir / "metrics.csv", straight / "metrics.csv")
