"""Stop a run at its first non-finite training loss, saying where and why (issue 23).

A learning rate far too high turns the loss into NaN within a few steps; without this check the
run went on, wrote NaN weights and finished with exit 0 and a normal-looking table. Every
stage's trainer gets this callback (``tus.runs.build_trainer``), so every method is covered.
It runs before the checkpoint callbacks (Lightning runs those last), so the step that produced
the NaN is never saved: the last checkpoint on disk is still a finite one.

Under ``16-mixed`` precision the gradient scaler skips steps whose gradients overflow and
lowers its scale, so a few non-finite losses (or skipped steps) in a row can be part of normal
training: ``trainer.max_nonfinite_steps`` (``auto``: 25 under 16-mixed, else 0) consecutive ones
are tolerated before the run stops. Skipped steps are counted too (the scaler's scale went
down), because a run whose gradients always overflow has a finite loss and never learns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

# Consecutive non-finite losses tolerated under 16-mixed: the scaler halves its scale at each,
# and 25 halvings take the default 2^16 below 0.01, past any transient overflow.
AMP_SKIPPED_STEPS = 25


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite; the message names the step and the likely cause."""


def resolve_max_nonfinite_steps(setting: int | str, precision: str) -> int:
    if setting == "auto":
        return AMP_SKIPPED_STEPS if str(precision).startswith("16") else 0
    return int(setting)


class StopOnNonFiniteLoss(Callback):
    """Raise :class:`NonFiniteLossError` after more than ``max_consecutive`` non-finite losses in a row."""

    def __init__(self, max_consecutive: int = 0):
        if max_consecutive < 0:
            raise ValueError(f"trainer.max_nonfinite_steps must be >= 0 or auto, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.streak = 0
        self.skipped = 0
        self._scale: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return  # manual optimisation without a returned loss: nothing to check
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:  # every rank stops together, or the others would wait forever
            finite = not trainer.strategy.reduce_boolean_decision(not finite, all=False)
        if finite:
            self.streak = 0
            self._check_skipped_steps(trainer)
            return
        self.streak += 1
        if self.streak > self.max_consecutive:
            raise NonFiniteLossError(describe(trainer, loss))

    def _check_skipped_steps(self, trainer: L.Trainer) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return
        scale = float(scaler.get_scale())
        skipped = self._scale is not None and scale < self._scale
        self._scale = scale
        self.skipped = self.skipped + 1 if skipped else 0
        if self.skipped > self.max_consecutive:
            raise NonFiniteLossError(
                f"the gradients overflowed in {self.skipped} consecutive steps under 16-mixed (up to step {trainer.global_step}, "
                f"scale now {scale:.3g}): those steps were skipped; the learning rate is likely too high, or use bf16-mixed or 32-true"
            )


def describe(trainer: L.Trainer, loss: torch.Tensor) -> str:
    value = loss.detach().float().flatten()
    shown = "NaN" if bool(value.isnan().any()) else "infinite"
    rates = [group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups if "lr" in group]
    lr = f" (largest lr {max(rates):.3g})" if rates and all(math.isfinite(r) for r in rates) else ""
    return (
        f"the training loss is {shown} at step {trainer.global_step} (epoch {trainer.current_epoch}): "
        f"the learning rate is likely too high{lr}, or the inputs hold non-finite values; "
        f"the run stopped and its last checkpoint (if any) is from before this step"
    )
