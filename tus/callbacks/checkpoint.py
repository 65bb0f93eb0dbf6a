"""The resume checkpoint every stage writes: ``checkpoints/last.ckpt``, replaced each time.

At epoch ends it is written at most every ``min_interval_s`` seconds of training. Why: a
ResNet-18 checkpoint with its AdamW state is ~130 MB, and writing it after every 2-second
epoch of a 64 px CV made fine-tuning 25-35% slower than a plain loop on a 2-core machine
(benchmarks/finetune_throughput.py). Epoch ends are kept as the only save points because
the fine-tuning data stream is reproducible from an epoch boundary, so a resumed run still
ends bit-identical to an uninterrupted one; a kill loses at most ``min_interval_s`` plus one
epoch of work. Step-based saving (``every_n_train_steps``, used by pretraining and diffusion,
whose samplers resume mid-epoch) is not throttled: the caller chose that cadence.

How a checkpoint reaches the disk (:class:`SafeCheckpointIO`): Lightning's own writer goes
through an fsspec transaction that writes to ``/tmp`` and moves the file across file systems,
so a full disk left a truncated ``last.ckpt`` that no resume could read. tus writes a temp file
in the checkpoint's own folder, fsyncs it and renames it over the old one, after hard-linking
the old one to ``last.prev.ckpt``: at every moment a complete checkpoint is on disk. A resume
(:func:`usable_checkpoint`) sets a checkpoint that does not load aside
(``last.ckpt.corrupt-<time>``) with a warning and takes the previous one. A writer killed
mid-save leaves its temp file (``.last.ckpt.partial-<pid>``); :func:`remove_stale_partials`
removes those of processes no longer running (a resume does, and a finished fold). Checkpoints are read
through tus's weights loader (``torch.load(weights_only=True)``): a pickle that would run code
is refused in one line, never set aside as merely corrupt and never unpickled.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from tus.config import as_storage_error, fsync_folder, process_alive
from tus.models.weights import CheckpointError, UnsafeCheckpointError, load_weights

# The previous complete resume checkpoint, kept beside ``last.ckpt`` (``*.ckpt``: finished runs drop it too).
PREVIOUS_SUFFIX = ".prev.ckpt"
# SafeCheckpointIO's temp files: ``.<name>.partial-<pid>`` and the ``.prev`` link made beside it.
_PARTIAL_NAME = re.compile(r"\..+\.partial-(\d+)(\.prev)?")


class ResumeCheckpoint(ModelCheckpoint):
    """``dirpath/last.ckpt`` at epoch ends (at most every ``min_interval_s``; 0 = every epoch) or
    every ``every_n_train_steps`` optimiser steps."""

    def __init__(self, dirpath: str | Path, *, every_n_train_steps: int | None = None, min_interval_s: float = 0.0):
        if min_interval_s < 0:
            raise ValueError(f"trainer.checkpoint_interval_s must be >= 0 (seconds), got {min_interval_s}")
        # One checkpoint named "last", replaced each time. Not ``save_last`` with ``save_top_k=0``:
        # Lightning 2.6 writes that "last" at an epoch end only when a top-k checkpoint was written
        # at the same step, i.e. never, so a killed fine-tuning fold restarted from epoch 0.
        super().__init__(dirpath=str(dirpath), filename="last", save_top_k=1, every_n_train_steps=every_n_train_steps)
        self.min_interval_s = float(min_interval_s)
        self.clock = time.monotonic  # replaceable in tests
        self._last_saved_at = self.clock()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_saved_at = self.clock()

    def _interval_elapsed(self, trainer: L.Trainer) -> bool:
        if self.min_interval_s <= 0 or self._every_n_train_steps >= 1:
            return True
        elapsed = self.clock() - self._last_saved_at >= self.min_interval_s
        # Rank 0 decides for all ranks: clocks differ, and saving is collective.
        return bool(trainer.strategy.broadcast(elapsed))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._interval_elapsed(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._interval_elapsed(trainer):
            super().on_validation_end(trainer, pl_module)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._last_saved_at = self.clock()


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Lightning's background writer, except that a failed write (a full disk) stops the run at
    the next save instead of after it: the next checkpoint is not attempted on a disk that
    just refused one, and the one on disk stays the last complete one."""

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        if self._error is not None:
            raise self._error
        super().save_checkpoint(*args, **kwargs)


def previous_of(path: Path) -> Path:
    """``last.ckpt`` -> ``last.prev.ckpt``."""
    return path.with_name(path.name.removesuffix(".ckpt") + PREVIOUS_SUFFIX)


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically in their own folder and read without unpickling code."""

    def __init__(self, keep_previous: Callable[[Path], bool] = lambda path: path.name == "last.ckpt"):
        self.keep_previous = keep_previous

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        tmp = partial_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            if self.keep_previous(path) and path.is_file():
                _keep_as_previous(path, tmp.with_name(tmp.name + ".prev"))
            os.replace(tmp, path)
            fsync_folder(path.parent)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise as_storage_error(error, path) from error

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is always on, whatever a caller asks: tus never unpickles a checkpoint.
        checkpoint = load_weights(path)
        if not isinstance(checkpoint, dict):
            raise CheckpointError(f"{path}: not a Lightning checkpoint (holds a {type(checkpoint).__name__})")
        return checkpoint


def partial_path(path: Path, pid: int | None = None) -> Path:
    """The temp file a checkpoint is written to before its rename: ``.<name>.partial-<pid>``."""
    return path.with_name(f".{path.name}.partial-{os.getpid() if pid is None else pid}")


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the temp files of checkpoint writes in ``folder`` whose process no longer runs
    (a SIGKILL mid-save leaves one, as large as a checkpoint); the paths removed. A running
    process's, this one's included, are left to it."""
    removed = []
    for candidate in sorted(Path(folder).glob(".*.partial-*")):
        match = _PARTIAL_NAME.fullmatch(candidate.name)
        if match is None or int(match.group(1)) == os.getpid() or process_alive(int(match.group(1))):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _keep_as_previous(path: Path, link: Path) -> None:
    """Hard-link ``path`` as its previous copy (no data copied). File systems without hard
    links keep no previous copy; the new checkpoint is still written atomically."""
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        return
    os.replace(link, previous_of(path))


def usable_checkpoint(path: Path, *, set_aside: bool = True) -> Path | None:
    """``path`` (e.g. ``last.ckpt``), or its previous copy, whichever loads first; None if neither.

    A checkpoint that does not load (truncated, corrupt) is renamed to
    ``<name>.corrupt-<time>`` (when ``set_aside``) with a warning on stderr; one that would run
    code raises :class:`~tus.models.weights.UnsafeCheckpointError` (one line).
    """
    for candidate in (path, previous_of(path)):
        if not candidate.is_file():
            continue
        try:
            load_weights(candidate)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as error:
            message = f"warning: {candidate} does not load ({error}); "
            if set_aside:
                aside = candidate.with_name(f"{candidate.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
                try:
                    candidate.rename(aside)
                    message += f"set aside as {aside.name}; "
                except FileNotFoundError:
                    pass  # another rank set it aside first
            fallback = previous_of(path) if candidate == path and previous_of(path).is_file() else None
            print(message + (f"resuming from {fallback.name}" if fallback else "starting this run over"), file=sys.stderr, flush=True)
            continue
        return candidate
    return None
