"""Stop a fit on SIGTERM/SIGUSR1 where the stage resumes exactly, with a fresh ``last.ckpt``.

Lightning's own SIGTERM handling stops at the end of the current batch and saves nothing, then
raises a SystemExit with code 0 (a preempted run looked finished). Fine-tuning and diffusion
resume exactly only from an epoch end (their data streams restart at epoch boundaries), so a
checkpoint from mid-epoch would not give the uninterrupted result. This callback replaces
Lightning's handlers while the fit runs (:func:`tus.preemption.handle_signal`, recording only)
and, once a signal came:

- ``save_point="step"`` (pretraining: its sampler is positioned by step): saves ``last.ckpt``
  at the end of the current step and stops;
- ``save_point="epoch"``: trains on to the epoch's end, saves ``last.ckpt`` there and stops;
  if that takes longer than the grace (:func:`tus.preemption.grace_s`), it stops at the next
  step without saving, keeping the previous checkpoint.

Under DDP the ranks agree (any rank's signal stops all) with one small all-reduce per step.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

from tus import preemption
from tus.callbacks.checkpoint import ResumeCheckpoint

_NONE, _REQUESTED, _GRACE_PASSED = 0, 1, 2


def run_dir_of(folder: str | Path) -> str:
    """The run dir a fit belongs to (what ``--resume`` takes): the nearest folder, ``folder`` or
    above, holding ``config.yaml`` (a CV's fold runs sit in ``<run dir>/runs/fold<F>-seed<S>``)."""
    folder = Path(folder).resolve()
    for candidate in (folder, *folder.parents):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    return str(folder)


class StopAtResumablePoint(Callback):
    def __init__(self, save_point: Literal["step", "epoch"] = "epoch"):
        self.save_point = save_point
        self._trainer: L.Trainer | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        # A signal recorded during an earlier fit was turned into a stop that a caller handled
        # (outside a fit, tus's handler stops at once and records nothing pending).
        preemption.STATE.signum = preemption.STATE.at = preemption.STATE.checkpoint = preemption.STATE.step = None
        preemption.STATE.run_dir = run_dir_of(trainer.default_root_dir)
        preemption.STATE.deferred = True
        # Lightning registered its handlers just before; the fit's handlers are ours (Lightning
        # restores the ones from before the fit when it tears down).
        if threading.current_thread() is threading.main_thread():
            for signum in preemption.STOP_SIGNALS:
                signal.signal(signum, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        preemption.handle_signal(signum, frame)
        # Lightning's DDP launcher started the other ranks itself: pass the signal on.
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if isinstance(launcher, _SubprocessScriptLauncher):
            launcher.kill(signum)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        preemption.STATE.deferred = False
        signum = preemption.requested()
        if signum is not None:  # came in the last step or epoch: training is complete, the run is not
            raise preemption.TrainingStopped(signum)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        preemption.STATE.deferred = False

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        preemption.STATE.deferred = False

    def _status(self, trainer: L.Trainer) -> int:
        status = _NONE
        if preemption.requested() is not None:
            status = _GRACE_PASSED if preemption.grace_passed() else _REQUESTED
        if trainer.world_size > 1:
            tensor = torch.tensor(status, device=trainer.strategy.root_device)
            status = int(trainer.strategy.reduce(tensor, reduce_op="max").item())
        return status

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.received_sigterm:  # stopping already
            return
        status = self._status(trainer)
        if status == _NONE:
            return
        if self.save_point == "step":
            self._stop(trainer, save=True)
        elif status == _GRACE_PASSED:
            self._stop(trainer, save=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.received_sigterm and self._status(trainer) != _NONE:
            self._stop(trainer, save=True)

    def _stop(self, trainer: L.Trainer, *, save: bool) -> None:
        if save:
            checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ResumeCheckpoint)), None)
            if checkpoint is not None and checkpoint.dirpath:
                path = str(Path(checkpoint.dirpath) / "last.ckpt")
                # A step-based checkpoint was just written at this step (diffusion's "epoch" is
                # its checkpoint period): that one is the exact resume point, keep it.
                if checkpoint._last_global_step_saved != trainer.global_step:
                    # Through the checkpoint callback, as its own saves go (same file, same
                    # writer); it then skips its own save at this step.
                    checkpoint._save_checkpoint(trainer, path)
                preemption.STATE.checkpoint, preemption.STATE.step = path, trainer.global_step
        # Lightning's own stop: it raises at the end of this step (after logging it) or of
        # this epoch's end hooks, on every rank, and tears the fit down; tus.cli.main turns
        # its exception into exit 128 + signal.
        trainer._signal_connector.received_sigterm = True
