"""ResumeCheckpoint: epoch-end saves throttled by seconds of training, step saves untouched;
the temp files of writes killed mid-save are removed once their process is gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tus.callbacks.checkpoint import ResumeCheckpoint, remove_stale_partials


class TinyRegression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 2, generator=generator), torch.randn(8, 1, generator=generator)), batch_size=4)


class FakeClock:
    """A clock that advances ``step_s`` per reading."""

    def __init__(self, step_s: float):
        self.now = 0.0
        self.step_s = step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


class SavedAt(ResumeCheckpoint):
    """Records the global step of every save."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved_steps: list[int] = []

    def _save_checkpoint(self, trainer, filepath):
        super()._save_checkpoint(trainer, filepath)
        self.saved_steps.append(trainer.global_step)


def fit(tmp_path: Path, callback: ResumeCheckpoint, epochs: int = 6) -> None:
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
    )
    trainer.fit(TinyRegression(), train_dataloaders=loader())


def test_interval_zero_saves_every_epoch_end(tmp_path):
    callback = SavedAt(tmp_path / "checkpoints", min_interval_s=0)
    fit(tmp_path, callback)
    assert callback.saved_steps == [2, 4, 6, 8, 10, 12]  # 2 batches an epoch
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12


def test_epoch_end_saves_wait_for_the_interval(tmp_path):
    # Each clock reading advances 1 s; the callback reads it once at train start, once per
    # epoch-end check and once after each save, so with a 2.5 s interval it saves every
    # other epoch end: the elapsed time at each check is 1, 2, 3 (save), 1, 2, 3 (save), ...
    callback = SavedAt(tmp_path / "checkpoints", min_interval_s=2.5)
    callback.clock = FakeClock(1.0)
    fit(tmp_path, callback)
    assert callback.saved_steps == [6, 12]


def test_long_interval_writes_no_epoch_end_checkpoint(tmp_path):
    callback = SavedAt(tmp_path / "checkpoints", min_interval_s=3600)
    fit(tmp_path, callback)
    assert callback.saved_steps == []
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_step_cadence_is_not_throttled(tmp_path):
    callback = SavedAt(tmp_path / "checkpoints", every_n_train_steps=3, min_interval_s=3600)
    fit(tmp_path, callback)
    assert callback.saved_steps == [3, 6, 9, 12]


def test_negative_interval_names_the_option():
    with pytest.raises(ValueError, match="trainer.checkpoint_interval_s"):
        ResumeCheckpoint("unused", min_interval_s=-1)


def test_only_the_partial_files_of_ended_processes_are_removed(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # reaped: its pid names no process now
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".last.ckpt.partial-{ended.pid}",
            "dead_link": f".last.ckpt.partial-{ended.pid}.prev",
            "running": f".last.ckpt.partial-{running.pid}",
            "mine": f".last.ckpt.partial-{os.getpid()}",
            "checkpoint": "last.ckpt",
            "previous": "last.prev.ckpt",
            "other": ".last.ckpt.partial-x",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"x")
        removed = remove_stale_partials(tmp_path)
    finally:
        running.kill()
        running.wait()
    gone = {names["dead"], names["dead_link"]}
    assert sorted(p.name for p in removed) == sorted(gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names.values()) - gone)
    assert remove_stale_partials(tmp_path / "absent") == []
