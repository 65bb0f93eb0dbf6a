"""Record every training sample's loss at every step: the input of noisy-label flagging.

The table (``losses.csv``) has one row per *occurrence* of a sample in training: a weighted
sampler may draw a sample several times in an epoch, or not at all, and each draw is a row.
Columns: the run's info (e.g. ``fold``, ``seed``, ``init``), ``epoch``, ``step`` (the
optimiser step the batch contributed to, i.e. ``trainer.global_step`` before it),
``sample_id``, ``label`` and ``loss`` (the unreduced loss the model computed in its training
step; read from ``training_step``'s ``per_sample_loss`` output, so there is no extra forward
pass).

Rows are buffered on the device and written (appended) at each epoch end and whenever a
checkpoint is saved, so everything a checkpoint covers is on disk. A resumed run first drops
the rows of steps the checkpoint does not cover, so redone steps are not recorded twice.

Under DDP every rank records its own shard; rows are gathered to rank 0, which alone writes.
Lightning's ``DistributedSampler`` (and its wrapper around a weighted sampler) pads the epoch's
index list by repeating its first indices so every rank gets as many samples; those padded
occurrences are artefacts of sharding, not draws of the sampler, and are not recorded. Rank
``r``'s ``i``-th sample of an epoch sits at position ``i * world_size + r`` of the padded
list; positions past the unpadded length are the padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pandas as pd
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

LOSS_COLUMNS = ("epoch", "step", "sample_id", "label", "loss")


@dataclass
class _Chunk:
    """One batch's losses, kept on the device until the next flush (no per-step sync)."""

    epoch: int
    step: int
    first_position: int
    sample_ids: list[str]
    labels: torch.Tensor
    losses: torch.Tensor


@dataclass(frozen=True)
class _Sharding:
    """How this rank's samples map onto the epoch's padded index list."""

    rank: int
    world_size: int
    real_length: int

    def is_padding(self, position: int) -> bool:
        return position * self.world_size + self.rank >= self.real_length


class PerSampleLossRecorder(Callback):
    """Append one row per training-sample occurrence to ``path`` (CSV).

    ``run_info`` entries become constant columns (e.g. ``{"fold": 0, "seed": 1, "init":
    "imagenet"}``). The module's ``training_step`` must return ``{"loss": ...,
    "per_sample_loss": (B,) tensor}`` and batches must carry ``sample_id`` and ``label``.
    """

    def __init__(self, path: str | Path, run_info: dict | None = None, loss_key: str = "per_sample_loss"):
        self.path = Path(path)
        self.run_info = dict(run_info or {})
        self.loss_key = loss_key
        self._chunks: list[_Chunk] = []
        self._step = 0
        self._position = 0
        self._sharding: _Sharding | None = None

    @property
    def columns(self) -> list[str]:
        return [*self.run_info, *LOSS_COLUMNS]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs after a resumed run restored its step counter: rows of later steps were
        # recorded by the interrupted attempt and will be recorded again.
        if trainer.is_global_zero and self.path.exists():
            recorded = pd.read_csv(self.path, dtype={"sample_id": str})
            kept = recorded[recorded["step"] < trainer.global_step]
            if len(kept) < len(recorded):
                tmp = self.path.with_suffix(".csv.tmp")
                kept.to_csv(tmp, index=False)
                tmp.replace(self.path)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._position = 0
        self._sharding = _find_sharding(trainer.train_dataloader)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        sample_ids = list(batch["sample_id"])
        first_position = self._position
        self._position += len(sample_ids)
        if outputs is None:  # training_step skipped this batch
            return
        if not isinstance(outputs, dict) or self.loss_key not in outputs:
            raise KeyError(
                f"{type(pl_module).__name__}.training_step must return a dict with '{self.loss_key}' (the unreduced per-sample loss) for {type(self).__name__}; got {type(outputs).__name__}"
            )
        losses = outputs[self.loss_key].detach()
        if losses.shape != (len(sample_ids),):
            raise ValueError(f"'{self.loss_key}' has shape {tuple(losses.shape)}, expected ({len(sample_ids)},): one loss per sample")
        self._chunks.append(_Chunk(trainer.current_epoch, self._step, first_position, sample_ids, batch["label"].detach(), losses))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        # Everything the checkpoint covers must be on disk: a resume will not redo it.
        # Lightning calls this on every rank, so the gather inside is safe.
        self.flush(trainer)

    def flush(self, trainer: L.Trainer) -> None:
        """Gather the buffered rows to rank 0 and append them to the table."""
        rows = self._rows()
        self._chunks = []
        # The trainer's world size, not the process group's: a group left behind by an earlier
        # DDP stage in the same process must not make a single-device run wait for peers.
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            shards = [None] * dist.get_world_size()
            dist.all_gather_object(shards, rows)
            rows = {column: [v for shard in shards for v in shard[column]] for column in rows}
        if not trainer.is_global_zero or not rows["sample_id"]:
            return
        table = pd.DataFrame(rows, columns=self.columns).sort_values(["step", "sample_id"], kind="stable")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(self.path, mode="a", header=not self.path.exists(), index=False)

    def _rows(self) -> dict[str, list]:
        rows: dict[str, list] = {column: [] for column in self.columns}
        for chunk in self._chunks:
            labels = chunk.labels.cpu().tolist()
            losses = chunk.losses.float().cpu().tolist()
            for offset, (sample_id, label, loss) in enumerate(zip(chunk.sample_ids, labels, losses)):
                if self._sharding is not None and self._sharding.is_padding(chunk.first_position + offset):
                    continue
                for key, value in self.run_info.items():
                    rows[key].append(value)
                rows["epoch"].append(chunk.epoch)
                rows["step"].append(chunk.step)
                rows["sample_id"].append(str(sample_id))
                rows["label"].append(int(label))
                rows["loss"].append(loss)
        return rows


def _find_sharding(loader) -> _Sharding | None:
    """The padding geometry of a DistributedSampler feeding ``loader``, if any."""
    if not isinstance(loader, DataLoader):
        return None
    batch_sampler = loader.batch_sampler
    sampler = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else loader.sampler
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    return _Sharding(rank=sampler.rank, world_size=sampler.num_replicas, real_length=len(sampler.dataset))
