"""PerSampleLossRecorder: one row per training-sample occurrence, with the loss the model computed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from tests.helpers import free_port
from tus.callbacks.loss_recorder import PerSampleLossRecorder
from tus.methods.classifier import FineTuneModule, FineTuneOptimConfig
from tus.models.backbones import BackboneConfig

NUM_SAMPLES = 15  # odd: two DDP ranks need one padded sample per epoch
BATCH_SIZE = 4
SAMPLER_SEED = 7
RUN_INFO = {"fold": 1, "seed": 3, "init": "scratch"}


class TinyLabelledImages(Dataset):
    """In-memory 32 px images with a few positives, batched like ManifestDataset."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(NUM_SAMPLES, 1, 32, 32, generator=generator)
        self.labels = [int(i % 4 == 0) for i in range(NUM_SAMPLES)]

    def __len__(self) -> int:
        return NUM_SAMPLES

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "sample_id": f"s{index:02d}", "label": self.labels[index], "index": index}


def weighted_sampler(dataset: TinyLabelledImages) -> WeightedRandomSampler:
    labels = np.array(dataset.labels)
    weights = 1.0 / np.bincount(labels)[labels]
    return WeightedRandomSampler(weights.tolist(), num_samples=len(labels), replacement=True, generator=torch.Generator().manual_seed(SAMPLER_SEED))


class WeightedTinyData(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        dataset = TinyLabelledImages()
        return DataLoader(dataset, batch_size=BATCH_SIZE, sampler=weighted_sampler(dataset))


def expected_draws(epochs: int) -> list[Counter]:
    """The sample ids the weighted sampler draws in each epoch (same seed as the run's)."""
    dataset = TinyLabelledImages()
    sampler = weighted_sampler(dataset)
    return [Counter(f"s{i:02d}" for i in sampler) for _ in range(epochs)]


def tiny_module() -> FineTuneModule:
    torch.manual_seed(0)
    return FineTuneModule(BackboneConfig(name="test_resnet", init="scratch"), FineTuneOptimConfig(lr_backbone=1e-2, lr_head=1e-2))


class ManualForward(Callback):
    """Recomputes each batch's per-sample loss with a separate forward in train mode."""

    def __init__(self):
        self.losses: dict[int, list[tuple[str, float]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert pl_module.training
        with torch.no_grad():
            losses = F.cross_entropy(pl_module(batch["image"]), batch["label"], reduction="none")
        self.losses[trainer.global_step] = sorted(zip(batch["sample_id"], losses.tolist()))


def trainer(tmp_path: Path, max_epochs: int, callbacks: list, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        **kwargs,
    )


def read_losses(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"sample_id": str})


def test_one_row_per_draw_with_the_loss_the_model_computed(tmp_path):
    path = tmp_path / "losses.csv"
    manual = ManualForward()
    # The manual forward runs first (callback order), while the weights are those of the step.
    trainer(tmp_path, 2, [manual, PerSampleLossRecorder(path, RUN_INFO)], enable_checkpointing=False).fit(tiny_module(), datamodule=WeightedTinyData())

    table = read_losses(path)
    assert list(table.columns) == ["fold", "seed", "init", "epoch", "step", "sample_id", "label", "loss"]
    assert (table[["fold", "seed", "init"]].drop_duplicates().values.tolist()) == [[1, 3, "scratch"]]
    draws = expected_draws(2)
    assert len(table) == 2 * NUM_SAMPLES
    for epoch in (0, 1):
        recorded = Counter(table.loc[table["epoch"] == epoch, "sample_id"])
        assert recorded == draws[epoch]
    # some sample is drawn twice and some never: one row per occurrence, none for misses
    assert max(draws[0].values()) > 1 and len(draws[0]) < NUM_SAMPLES
    assert sorted(table["step"].unique()) == list(range(8))  # ceil(15 / 4) = 4 steps per epoch
    for step, rows in table.groupby("step"):
        recorded = sorted(zip(rows["sample_id"], rows["loss"]))
        assert [s for s, _ in recorded] == [s for s, _ in manual.losses[step]]
        np.testing.assert_allclose([loss for _, loss in recorded], [loss for _, loss in manual.losses[step]], rtol=1e-6, atol=1e-7)
    labels = {f"s{i:02d}": int(i % 4 == 0) for i in range(NUM_SAMPLES)}
    assert (table["label"] == table["sample_id"].map(labels)).all()


def test_resume_keeps_earlier_epochs_and_drops_uncovered_rows(tmp_path):
    path = tmp_path / "losses.csv"
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), save_last=True, save_top_k=0)
    trainer(tmp_path, 1, [checkpoints, PerSampleLossRecorder(path, RUN_INFO)]).fit(tiny_module(), datamodule=WeightedTinyData())
    # An interrupted attempt may have recorded steps its checkpoint does not cover.
    uncovered = read_losses(path).head(3).assign(epoch=1, step=99)
    uncovered.to_csv(path, mode="a", header=False, index=False)

    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), save_last=True, save_top_k=0)
    trainer(tmp_path, 2, [checkpoints, PerSampleLossRecorder(path, RUN_INFO)]).fit(tiny_module(), datamodule=WeightedTinyData(), ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    table = read_losses(path)
    assert table.groupby("epoch").size().to_dict() == {0: NUM_SAMPLES, 1: NUM_SAMPLES}
    assert 99 not in set(table["step"])
    assert sorted(table["step"].unique()) == list(range(8))


def test_missing_per_sample_loss_is_a_clear_error(tmp_path):
    class MeanLossOnly(FineTuneModule):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]

    module = MeanLossOnly(BackboneConfig(name="test_resnet", init="scratch"), FineTuneOptimConfig())
    with pytest.raises(KeyError, match="per_sample_loss"):
        trainer(tmp_path, 1, [PerSampleLossRecorder(tmp_path / "losses.csv")], enable_checkpointing=False).fit(module, datamodule=WeightedTinyData())


def test_ddp_gathers_every_rank_without_sampler_padding(tmp_path, monkeypatch):
    # Lightning's launcher sets MASTER_PORT in this process; keep it from leaking to later tests.
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    path = tmp_path / "losses.csv"
    ddp = trainer(tmp_path, 2, [PerSampleLossRecorder(path, RUN_INFO)], devices=2, strategy="ddp_fork", enable_checkpointing=False)
    ddp.fit(tiny_module(), datamodule=WeightedTinyData())

    table = read_losses(path)
    # 15 draws shard over 2 ranks as 8 + 8 with one padded repeat per epoch; it is not a draw.
    assert len(table) == 2 * NUM_SAMPLES
    draws = expected_draws(2)
    for epoch in (0, 1):
        assert Counter(table.loc[table["epoch"] == epoch, "sample_id"]) == draws[epoch]
    assert np.isfinite(table["loss"]).all() and (table["loss"] > 0).all()
    # 8 samples per rank in batches of 4: two steps per epoch, both ranks' rows in each
    assert table.groupby("step").size().to_dict() == {0: 8, 1: 7, 2: 8, 3: 7}
