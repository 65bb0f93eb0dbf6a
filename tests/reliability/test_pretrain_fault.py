"""Pretraining killed (SIGKILL) at a random step, mid-epoch included, or stopped by SIGTERM (it
saves the current step, exits 143 and prints how to resume), and resumed with ``--resume``
ends identical to an uninterrupted run: the same images and views at the same steps, so the
same encoder bits and metrics.csv rows (no duplicated steps)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.reliability import faults
from tests.reliability.faults import interrupted_beside_twin, saved_step, stopped, tus_in_process
from tests.stages.test_pretrain import make_pool
from tus.data.datamodules import ImageSourceConfig, PositionedWeightedSampler, SeededDraws
from tus.data.pools import PretrainDataConfig, PretrainDataModule

STEPS = 90  # long enough that a kill within 1 s of the first checkpoint lands mid-run


def overrides(manifest: Path, out: Path) -> list[str]:
    return [
        "--config",
        "pretrain/cpu",
        f"--data.sources=[{{manifest: '{manifest}'}}]",
        f"--output_root={out}",
        "--data.image_size=32",
        "--data.batch_size=8",
        "--data.num_workers=0",
        "--data.cache_images=false",
        "--method.model.backbone.name=test_resnet",
        "--method.model.projection_hidden_dim=32",
        "--method.model.projection_output_dim=16",
        "--trainer.precision=32-true",
        f"--trainer.max_steps={STEPS}",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        # The killed run and its uninterrupted twin start together: a memory format measured
        # by each under the other's load could differ, and the formats' results differ in the last bits.
        "--trainer.channels_last=false",
        "--method.schedule.warmup_steps=2",
        "--checkpoint_every_n_steps=3",
        "--monitor.every_n_steps=5",
        "--monitor.holdout_per_organ=2",
        "--monitor.bank_per_organ=8",
        "--monitor.knn_k=3",
        "--logging.wandb=false",
    ]


@pytest.mark.slow
def test_killed_and_terminated_pretraining_resumes_to_the_uninterrupted_run(tmp_path: Path):
    # 20 pool images in batches of 8: 2 steps an epoch, a checkpoint every 3 steps, so half the
    # checkpoints fall mid-epoch, where Lightning restarts a plain loader at the epoch's start.
    manifest = make_pool(tmp_path / "pool")
    (killed, terminated), straight = interrupted_beside_twin("pretrain", lambda out: overrides(manifest, out), tmp_path, {signal.SIGKILL: 7, signal.SIGTERM: 9})

    # SIGKILL at a random step; resumed with --resume from the last checkpoint written.
    run_dir = killed.run_dir
    assert killed.process.returncode == -signal.SIGKILL and not (run_dir / "encoder").exists()
    assert 0 < saved_step(run_dir) < STEPS
    faults.leave_partial_write(run_dir, killed.process.pid)
    tus_in_process("pretrain", "--resume", str(run_dir))
    assert_same_run(run_dir, straight)

    # SIGTERM: the current step is saved (a checkpoint mid-epoch) and the printed command resumes.
    run_dir = terminated.run_dir
    match, resume = stopped(terminated.process, "pretrain", run_dir)
    step = saved_step(run_dir)
    assert step == int(match.group(2)) and 0 < step < STEPS
    assert not (run_dir / "encoder").exists() and not (run_dir / "summary.json").exists()
    tus_in_process("pretrain", *resume)
    assert_same_run(run_dir, straight)


def assert_same_run(run_dir: Path, straight: Path) -> None:
    faults.assert_same_weights(run_dir / "encoder" / "model.safetensors", straight / "encoder" / "model.safetensors")
    faults.assert_no_duplicated_steps(run_dir / "metrics.csv")
    faults.assert_same_log(run_dir / "metrics.csv", straight / "metrics.csv")
    resumed_summary, straight_summary = (json.loads((d / "summary.json").read_text()) for d in (run_dir, straight))
    # The probe history in summary.json is the last attempt's (metrics.csv above holds every point).
    assert resumed_summary["steps"] == straight_summary["steps"] == STEPS
    assert resumed_summary["last"] == straight_summary["last"]
    assert faults.partial_writes(run_dir) == []


def test_stream_position_depends_on_seed_epoch_and_position_only(tmp_path: Path):
    """The k-th batch of epoch e is the same whether the loader starts at the epoch's start or
    (resumed) k batches in, with or without worker processes; other epochs draw differently."""
    manifest = make_pool(tmp_path / "pool")
    config = PretrainDataConfig(sources=[ImageSourceConfig(manifest=str(manifest))], image_size=32, batch_size=4, num_workers=0)

    def epoch(number: int, steps_done: int, workers: int = 0) -> list[dict]:
        datamodule = PretrainDataModule(PretrainDataConfig(**{**config.__dict__, "num_workers": workers}), seed=0)
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        assert isinstance(loader.sampler, PositionedWeightedSampler) and isinstance(loader.dataset, SeededDraws)
        per_epoch = len(loader)
        datamodule.trainer = type("Trainer", (), {"global_step": number * per_epoch + steps_done, "current_epoch": number, "accumulate_grad_batches": 1})()
        loader.sampler.set_epoch(number)
        return list(loader)

    whole, resumed, with_workers, next_epoch = epoch(1, 0), epoch(1, 2), epoch(1, 0, workers=2), epoch(2, 0)
    assert len(whole) == 6 and len(resumed) == 4
    for a, b in zip(whole[2:], resumed):
        assert torch.equal(a["index"], b["index"]) and all(torch.equal(x, y) for x, y in zip(a["image"], b["image"]))
    for a, b in zip(whole, with_workers):
        assert torch.equal(a["index"], b["index"]) and all(torch.equal(x, y) for x, y in zip(a["image"], b["image"]))
    assert not torch.equal(torch.cat([b["index"] for b in whole]), torch.cat([b["index"] for b in next_epoch]))
    first = whole[0]["image"]
    assert not torch.equal(first[0], first[1])  # the two views of an image differ
