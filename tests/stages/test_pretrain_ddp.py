"""Two-process CPU DDP (gloo) equals one process seeing the whole batch: loss and update.

Why this holds: each rank's NT-Xent scores its own anchors against the views of both ranks
(lightly's gather keeps gradients), so the mean of the two rank losses is the global loss.
The gather's backward sums the gradient over ranks, giving each rank world_size x its share
of the global gradient, and DDP's gradient averaging divides it back. The organ loss is a
per-rank mean of equal-sized, fully labelled halves, so its DDP average is the global mean.

Batch norm would break the equivalence for a reason unrelated to the loss: each rank
normalises with its own half-batch statistics (SyncBatchNorm, which fixes that, needs GPUs).
The test therefore uses a model without batch-dependent statistics: timm's tiny ConvNeXt
(LayerNorm) with a projection head without batch norm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, Subset

from tests.helpers import free_port
from tests.stages.test_pretrain import make_pool
from tus.config import load_config
from tus.losses.contrastive import nt_xent_loss
from tus.methods.simclr_organ import PretrainLossConfig, PretrainModelConfig, SimCLROrgan, SimCLROrganConfig
from tus.models.backbones import BackboneConfig
from tus.optim import LarsConfig, ScheduleConfig
from tus.stages.pretrain import PretrainConfig

REPO = Path(__file__).resolve().parents[2]

WORLD_SIZE = 2
PER_RANK = 4
STEPS = 2
TEMPERATURE = 0.2


class FixedViews(Dataset):
    """Pre-drawn views, so both runs see exactly the same inputs."""

    def __init__(self, count: int, size: int = 32):
        generator = torch.Generator().manual_seed(0)
        self.first = torch.randn(count, 1, size, size, generator=generator)
        self.second = self.first + 0.3 * torch.randn(count, 1, size, size, generator=generator)
        self.organs = torch.arange(count) % 2

    def __len__(self) -> int:
        return len(self.organs)

    def __getitem__(self, index: int) -> dict:
        return {"image": [self.first[index], self.second[index]], "organ": self.organs[index], "index": index}


class Recorder(Callback):
    """Each rank saves its loss, sample indices and parameters after every optimizer step."""

    def __init__(self, out: Path):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        state = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
        record = {"loss": outputs["loss"].detach(), "index": batch["index"].clone(), "params": state}
        torch.save(record, self.out / f"rank{trainer.global_rank}-step{trainer.global_step}.pt")


def new_module(batch_size: int) -> SimCLROrgan:
    torch.manual_seed(0)
    model = PretrainModelConfig(
        backbone=BackboneConfig(name="test_convnext", init="scratch"),
        projection_hidden_dim=32,
        projection_output_dim=16,
        projection_batch_norm=False,
    )
    loss = PretrainLossConfig(contrastive_weight=1.0, organ_weight=0.2, temperature=TEMPERATURE, gather_distributed=True)
    # A large learning rate so that one step visibly moves every parameter.
    optimizer = LarsConfig(lr_per_256=32.0, weight_decay=1e-4, trust_coeff=0.02)
    return SimCLROrgan(SimCLROrganConfig(model, loss, optimizer, ScheduleConfig(decay="constant")), num_organs=2, batch_size=batch_size)


def fit(out: Path, devices: int, batch_size: int, order: list[int] | None = None) -> None:
    """Train STEPS steps; ``order`` fixes which samples form each (single-process) batch."""
    out.mkdir()
    module = new_module(batch_size)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        # The two ranks in freshly spawned interpreters, the single arm in this one, itself a fresh
        # interpreter (the body runs in its own pytest process, see the test above): no state an
        # earlier test left reaches either arm (in a full run in one worker they once differed
        # from step 2 on). A spawned 1-process DDP for the single arm cost one more ~15 s start.
        strategy="ddp_spawn" if devices > 1 else "auto",
        use_distributed_sampler=devices > 1,  # the single arm keeps the order it is given
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Recorder(out)],
    )
    dataset = FixedViews(WORLD_SIZE * PER_RANK * STEPS)
    if order is not None:
        dataset = Subset(dataset, order)
    trainer.fit(module, train_dataloaders=DataLoader(dataset, batch_size=batch_size, shuffle=False))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_on_the_whole_batch(tmp_path: Path):
    """Run in a fresh interpreter: in a full suite run the comparison failed from step 2 on in
    one xdist worker only (state an earlier test left in that process, not yet pinned down), and
    the large learning rate makes any last-bit difference visible."""
    # Without what earlier tests' Lightning runs leave in os.environ (global seed, rendezvous, ranks).
    leftovers = ("PL_", "MASTER_", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_", "TORCHELASTIC_", "TUS_RUN_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(leftovers)}
    env.update({"TUS_DDP_EQUIVALENCE_BODY": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_PORT": str(free_port())})
    node = f"{Path(__file__).relative_to(REPO)}::test_ddp_equivalence_body"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", node, "--basetemp", str(tmp_path / "body")], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.mark.slow
def test_ddp_equivalence_body(tmp_path: Path, monkeypatch):
    if os.environ.get("TUS_DDP_EQUIVALENCE_BODY") != "1":
        pytest.skip("run by test_two_process_ddp_matches_one_process_on_the_whole_batch in a fresh interpreter")
    # Every process of both arms on one thread: the large learning rate turns the last-bit
    # differences of another thread count into visible ones by step 2 (Lightning's launcher sets
    # OMP_NUM_THREADS to cores // processes when it is unset, so the arms' counts differed).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    initial = {name: p.detach().clone() for name, p in new_module(PER_RANK).named_parameters()}
    fit(tmp_path / "ddp", devices=WORLD_SIZE, batch_size=PER_RANK)

    # The single process sees, at each step, the union of what the ranks saw at that step
    # (Lightning's distributed sampler decides the split).
    def load(run: str, rank: int, step: int) -> dict:
        return torch.load(tmp_path / run / f"rank{rank}-step{step}.pt", weights_only=True)

    order = [i for step in range(1, STEPS + 1) for rank in range(WORLD_SIZE) for i in load("ddp", rank, step)["index"].tolist()]
    fit(tmp_path / "single", devices=1, batch_size=WORLD_SIZE * PER_RANK, order=order)

    previous = initial
    for step in range(1, STEPS + 1):
        single = load("single", 0, step)
        ranks = [load("ddp", rank, step) for rank in range(WORLD_SIZE)]
        assert torch.equal(torch.cat([r["index"] for r in ranks]), single["index"])
        assert len(set(single["index"].tolist())) == WORLD_SIZE * PER_RANK  # the ranks saw different samples
        assert not torch.isclose(ranks[0]["loss"], ranks[1]["loss"])
        torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), single["loss"], rtol=1e-5, atol=1e-6)
        for name, expected in single["params"].items():
            for rank in ranks:
                torch.testing.assert_close(rank["params"][name], expected, rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
        moved = max((single["params"][n] - previous[n]).abs().max().item() for n in previous)
        assert moved > 1e-3, "the step should move the parameters, or the comparison proves nothing"
        previous = single["params"]


def test_without_gathering_each_half_batch_would_see_fewer_negatives():
    """The control: averaging per-half NT-Xent losses is not the global loss."""
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    whole = nt_xent_loss(z1, z2, TEMPERATURE)
    halves = (nt_xent_loss(z1[:4], z2[:4], TEMPERATURE) + nt_xent_loss(z1[4:], z2[4:], TEMPERATURE)) / 2
    assert abs(whole.item() - halves.item()) > 0.1


@pytest.mark.slow
def test_tus_pretrain_under_ddp_shares_one_run_dir_and_scales_the_learning_rate(tmp_path: Path):
    """``tus pretrain`` with strategy=ddp: Lightning relaunches the command for rank 1, which
    must join rank 0's run dir (not make its own); the lr is scaled by the global batch."""
    manifest = make_pool(tmp_path / "pool")
    command = [
        sys.executable,
        "-m",
        "tus.cli.main",
        "pretrain",
        "--config",
        str(REPO / "experiments/pretrain/cpu.yaml"),
        f"data.sources=[{{manifest: '{manifest}'}}]",
        f"output_root={tmp_path / 'runs'}",
        "data.image_size=32",
        f"data.batch_size={PER_RANK}",
        "data.num_workers=0",
        "method.model.backbone.name=test_resnet",
        "method.model.projection_hidden_dim=32",
        "method.model.projection_output_dim=16",
        "trainer.accelerator=cpu",
        f"trainer.devices={WORLD_SIZE}",
        "trainer.strategy=ddp",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "method.schedule.warmup_steps=0",
        "monitor.every_n_steps=2",
        "monitor.holdout_per_organ=2",
        "monitor.bank_per_organ=8",
        "monitor.knn_k=3",
        "logging.wandb=false",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "MASTER_PORT": str(free_port())}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert (run_dir / "encoder" / "model.safetensors").is_file()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    config = load_config(PretrainConfig, run_dir / "config.yaml")
    expected_lr = config.method["optimizer"]["lr_per_256"] * PER_RANK * WORLD_SIZE / 256
    assert metrics["lr-Lars/lars_adapted"].dropna().iloc[0] == pytest.approx(expected_lr)
